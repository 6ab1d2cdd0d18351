"""The chunked decoder (model.decode_chunk_genes): the same loss, gradients and distributions as one pass over
all genes, under activation checkpointing and the Triton kernels too; the automatic chunk size; and the
activation count plan uses for it."""

import os

# Before anything imports Triton (as tests/kernels/conftest.py does): its kernels then run in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402
from scldm_test_helpers import saved_tensor_bytes  # noqa: E402

from scldm_scale.config import VAEConfig  # noqa: E402
from scldm_scale.data.batch import collate  # noqa: E402
from scldm_scale.models.vae import MIN_DECODE_CHUNK, SetVAE  # noqa: E402
from scldm_scale.train.strategies import apply_activation_checkpointing  # noqa: E402

N_GENES = 30
TINY = dict(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8, mlp_ratio=2.0)
# fp32: the chunked path adds the same numbers in another order (the keys' and the weights' gradients are summed
# chunk by chunk): up to 2e-6 of a gradient's norm measured, compared as ||got - want|| / ||want||.
TOL = 1e-5


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    error = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    assert error < TOL, f"{what}: relative error {error:.2e}"


def _batch(n_cells: int = 5, n_genes: int = N_GENES, expressed: tuple[float, float] = (0.2, 0.9)):
    """Cells expressing from expressed[0] to expressed[1] of the genes."""
    rng = np.random.default_rng(0)
    dense = rng.negative_binomial(2.0, 0.3, size=(n_cells, n_genes)).astype(np.float32)
    dense *= rng.random((n_cells, n_genes)) < np.linspace(*expressed, n_cells)[:, None]  # ragged: real padding
    dense[:, 0] += 1
    return collate(sp.csr_matrix(dense), {})


def _pair(chunk: int, n_genes: int = N_GENES, **kwargs) -> tuple[SetVAE, SetVAE]:
    """One pass (decode_chunk_genes=-1) and `chunk` genes at a time, same weights away from the init."""
    torch.manual_seed(0)
    whole = SetVAE(VAEConfig(**{**TINY, **kwargs}, decode_chunk_genes=-1), n_genes)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in whole.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    chunked = SetVAE(VAEConfig(**{**TINY, **kwargs}, decode_chunk_genes=chunk), n_genes)
    chunked.load_state_dict(whole.state_dict())
    return whole, chunked


def _step(model: SetVAE, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(2)  # the same posterior draw for the Gaussian latent
    loss, _ = model(batch)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _assert_same_step(whole: SetVAE, chunked: SetVAE, batch) -> None:
    loss, grads = _step(whole, batch)
    loss_chunked, grads_chunked = _step(chunked, batch)
    _assert_close(loss_chunked, loss, "loss")
    assert grads_chunked.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad is not None and grads_chunked[name] is not None, name
        _assert_close(grads_chunked[name], grad, f"grad of {name}")


CONFIGS = [
    dict(),
    dict(theta_mode="cell"),
    dict(likelihood="gaussian"),
    dict(latent_mode="gaussian"),
    dict(share_gene_embedding=False),
    dict(latent_gene_path=True),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("chunk", [1, 7, 29])
def test_chunked_training_step_equals_one_pass(kwargs, chunk):
    whole, chunked = _pair(chunk, **kwargs)
    _assert_same_step(whole, chunked, _batch())


def test_chunks_are_recomputed_and_keep_no_cells_by_genes_by_width_tensor():
    whole, chunked = _pair(7)
    batch = _batch()
    calls = []
    chunked.unpool.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = chunked(batch)
    assert calls == [(5, 7, 16)] * 4 + [(5, 2, 16)]  # forward: five chunks of the 30 genes
    # The per-gene logits (B, G) and the gene queries (G, E), shared by all cells, are kept; no cell's hidden
    # vectors of any gene, (B, genes, E), are.
    assert (5, N_GENES) in shapes
    assert not [shape for shape in shapes if len(shape) == 3 and shape[1] in (2, 7, N_GENES) and shape[2] == 16]
    loss.backward()
    assert len(calls) == 10  # each chunk recomputed once in the backward pass


def test_chunked_step_under_activation_checkpointing_equals_one_pass():
    """train.activation_checkpointing wraps the unpooling block (a transformer block) in a checkpoint of its own:
    inside a chunk's checkpoint that nests, and must change nothing."""
    whole, chunked = _pair(7)
    apply_activation_checkpointing(chunked)
    _assert_same_step(whole, chunked, _batch())


@pytest.mark.parametrize("likelihood", ["nb", "gaussian"])
def test_inference_decodes_in_chunks_to_the_same_distribution(likelihood):
    whole, chunked = _pair(4, likelihood=likelihood)
    batch = _batch()
    with torch.no_grad():
        z, _ = whole.encode(batch.gene_ids, batch.counts, batch.mask)
        for got, want, what in zip(
            chunked.distribution(z, batch.decode_gene_ids, batch.library_size),
            whole.distribution(z, batch.decode_gene_ids, batch.library_size),
            ("mean", "dispersion"),
            strict=True,
        ):
            _assert_close(got, want, what)
        torch.manual_seed(3)
        counts = chunked.sample_counts(z, batch.decode_gene_ids, batch.library_size)
        torch.manual_seed(3)
        torch.testing.assert_close(counts, whole.sample_counts(z, batch.decode_gene_ids, batch.library_size))


def test_triton_kernels_chunked_equal_one_pass():
    """attention_backend=triton (the unpooling kernel per chunk) and nb_loss_backend=triton (the fused loss on
    the gathered (B, G) logits), under the interpreter on the CPU."""
    from scldm_kernels import _triton

    pytest.importorskip("triton")
    assert _triton.kernel_unavailable_reason(torch.zeros(1)) is None, "TRITON_INTERPRET=1 was not set in time"
    for theta_mode in ("gene", "cell"):
        whole, chunked = _pair(
            6, n_genes=17, attention_backend="triton", nb_loss_backend="triton", theta_mode=theta_mode
        )
        _assert_same_step(whole, chunked, _batch(n_cells=3, n_genes=17))


def test_automatic_chunk_fits_the_budget_and_respects_the_settings():
    d64 = dict(d_model=64, n_heads=4, n_cross_heads=4, n_layers=2, n_latent_tokens=16, latent_dim=16)
    auto = SetVAE(VAEConfig(**d64), 40)
    assert auto.decode_chunk(32, 32_000) == 1920  # 2**26 // (32 cells x 1,088 elements per gene), to 64s
    assert auto.decode_chunk(32, 1000) == 1000  # never more than the genes decoded
    assert auto.decode_chunk(100_000, 32_000) == MIN_DECODE_CHUNK
    assert SetVAE(VAEConfig(**d64, decode_chunk_genes=-1), 40).decode_chunk(32, 32_000) == 32_000
    assert SetVAE(VAEConfig(**d64, decode_chunk_genes=500), 40).decode_chunk(32, 32_000) == 500


def test_activation_profile_counts_the_kept_outputs_and_one_chunk():
    """What the forward pass saves is the profile with the unpooling at its input (the keys), and a chunk's
    recomputation saves the rest of its block: within 15% each, as tests/train/test_plan.py measures."""
    n_genes, chunk, n_cells = 400, 64, 8
    whole, chunked = _pair(chunk, n_genes=n_genes, d_model=32, n_latent_tokens=8)
    batch = _batch(n_cells=n_cells, n_genes=n_genes, expressed=(0.05, 0.15))  # as in scRNA-seq
    profile = chunked.activation_profile(batch.gene_ids.shape[1], n_genes, n_cells)
    kept = (sum(profile.block_full[:-1]) + profile.block_input[-1] + profile.outside) * 4 + profile.outside_fp32 * 4
    assert n_cells * kept == pytest.approx(saved_tensor_bytes(chunked, lambda: chunked(batch)[0]), rel=0.15)
    z, _ = chunked.encode(batch.gene_ids, batch.counts, batch.mask)
    h = chunked.decode_latents(z).detach().requires_grad_()
    queries = chunked.decoder_gene_embedding(batch.decode_gene_ids[:chunk])
    recomputed = saved_tensor_bytes(chunked, lambda: chunked._head_outputs(h, queries, batch.decode_gene_ids[:chunk]))
    working_set = (profile.block_full[-1] - profile.block_input[-1]) * 4
    assert n_cells * working_set == pytest.approx(recomputed, rel=0.15)


def test_the_decoder_sets_its_host_memory_policy_on_the_cpu(monkeypatch):
    """host_memory.py: a one-pass decoder keeps freed blocks in the heap (page faults every step cost the
    quickstart 2x its time with the chunked policy); a chunked one returns them to the OS."""
    import scldm_scale.models.vae as vae_module

    calls = []
    monkeypatch.setattr(vae_module, "decoder_memory_policy", lambda chunked: calls.append(chunked))
    whole, chunked = _pair(chunk=7)
    batch = _batch()
    _step(whole, batch)
    assert set(calls) == {False}
    calls.clear()
    _step(chunked, batch)
    assert set(calls) == {True}
