"""The models' FLOP counts against torch's FlopCounterMode on tiny models, the GPU peak table, and MFU.

Tolerances: FlopCounterMode counts exactly the matmuls (mm, addmm, bmm; attention too once SDPA runs on
its MATH backend, which decomposes into bmm), and the formula counts exactly those, so the forward
counts must agree to rounding (rel 1e-9): any layer the formula missed would show. The training count
is the formula's 3x forward against a measured forward + backward, within 3%: the backward skips the
input gradients of the first projections whose inputs need none (the DiT's latent and timestep
projections: 2.94x at width 32).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scldm_scale.config import PriorConfig, VAEConfig, load_config
from scldm_scale.hardware import lookup_peak_tflops
from scldm_scale.models.dit import DiT
from scldm_scale.models.prior import FlowMatchingPrior, LatentBatch
from scldm_scale.models.vae import SetVAE
from scldm_scale.train import flops
from scldm_scale.train.flops import dit_forward_flops, mfu, peak_tflops, train_flops_per_cell, vae_forward_flops

# Odd sizes on purpose: every dimension distinct, so a swapped factor cannot cancel out.
N_GENES, N_TOKENS, BATCH = 37, 11, 3


def measured_flops(fn, backward: bool) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = fn()
        if backward:
            loss.backward()
    return counter.get_total_flops()


def cell_batch(generator: torch.Generator) -> SimpleNamespace:
    mask = torch.ones(BATCH, N_TOKENS, dtype=torch.bool)
    mask[0, 7:] = False  # padding costs the same FLOPs: S is the padded length
    return SimpleNamespace(
        gene_ids=torch.randint(0, N_GENES, (BATCH, N_TOKENS), generator=generator),
        counts=torch.randint(1, 6, (BATCH, N_TOKENS), generator=generator).float(),
        mask=mask,
        decode_gene_ids=torch.arange(N_GENES),
        library_size=torch.full((BATCH,), 100.0),
        target=torch.randint(0, 6, (BATCH, N_GENES), generator=generator).float(),
    )


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"input_embedding": "concat", "theta_mode": "cell", "latent_mode": "gaussian"},
        {"likelihood": "gaussian", "share_gene_embedding": False, "mlp_ratio": 2.0},
    ],
)
def test_vae_flops_match_flop_counter(variant):
    torch.manual_seed(0)
    cfg = VAEConfig(d_model=24, n_heads=3, n_cross_heads=2, n_layers=2, n_latent_tokens=5, latent_dim=7, **variant)
    vae = SetVAE(cfg, N_GENES)
    batch = cell_batch(torch.Generator().manual_seed(0))
    expected = vae_forward_flops(cfg, N_GENES, N_TOKENS, BATCH)
    forward = measured_flops(lambda: vae(batch)[0], backward=False)
    assert forward / BATCH == pytest.approx(expected, rel=1e-9)
    train = measured_flops(lambda: vae(batch)[0], backward=True)
    assert train / BATCH == pytest.approx(flops.TRAIN_FLOPS_FACTOR * expected, rel=0.03)


def test_dit_flops_match_flop_counter():
    torch.manual_seed(0)
    cfg = PriorConfig(d_model=32, n_heads=4, n_layers=2, mlp_ratio=3.0)
    n_tokens, token_dim, batch_size = 5, 7, 4
    prior = FlowMatchingPrior(DiT(cfg, n_tokens, token_dim, {"cell_type": 3, "tissue": 2}), 0.2, "independent")
    batch = LatentBatch(torch.randn(batch_size, n_tokens, token_dim), {"cell_type": torch.tensor([0, 1, 2, 0])})
    expected = dit_forward_flops(cfg, n_tokens, token_dim)
    forward = measured_flops(lambda: prior(batch)[0], backward=False)
    assert forward / batch_size == pytest.approx(expected, rel=1e-9)
    train = measured_flops(lambda: prior(batch)[0], backward=True)
    assert train / batch_size == pytest.approx(flops.TRAIN_FLOPS_FACTOR * expected, rel=0.03)


def test_train_flops_follow_the_stage():
    vae_cfg = load_config(None, ["train.batch_size=8"])
    assert train_flops_per_cell(vae_cfg, 500, 50) == 3 * vae_forward_flops(vae_cfg.model, 500, 50, 8)
    ldm_cfg = load_config(None, ["stage=ldm", "train.vae_checkpoint=v.pt", "model.n_latent_tokens=12"])
    assert train_flops_per_cell(ldm_cfg, 500, 50) == 3 * dit_forward_flops(ldm_cfg.prior, 12, ldm_cfg.model.latent_dim)


def test_shared_query_projections_are_amortised_over_the_batch():
    cfg = VAEConfig(d_model=64, n_latent_tokens=8)
    one, many = vae_forward_flops(cfg, 1000, 100, 1), vae_forward_flops(cfg, 1000, 100, 10)
    # The pooling (M queries) and unpooling (G queries) projections, 2 (M + G) E^2, are paid once per batch.
    assert one - many == pytest.approx(2 * (8 + 1000) * 64**2 * (1 - 1 / 10))


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA H20", 148.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("Tesla V100-SXM2-16GB", 125.0),
        ("Tesla V100-PCIE-32GB", 112.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("Tesla T4", 65.0),
        ("Some Future Accelerator", None),
    ],
)
def test_peak_table_matches_cuda_device_names(name, tflops):
    assert lookup_peak_tflops(name) == tflops


def test_peak_tflops_cpu_override_and_cuda(monkeypatch):
    assert peak_tflops("cpu") is None
    assert peak_tflops(None) is None
    assert peak_tflops("cpu", override=100.0) == 100.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_tflops(torch.device("cuda", 0)) == 756.0
    assert peak_tflops("cuda", override=500.0) == 500.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Unlisted GPU")
    assert peak_tflops("cuda") is None


def test_mfu():
    assert mfu(494.5e12, 989.0) == pytest.approx(0.5)
    assert mfu(1e12, None) is None
