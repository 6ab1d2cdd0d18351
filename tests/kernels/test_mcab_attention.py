"""Fused MCAB cross-attention (pooling, unpooling) against the float64 PyTorch reference, under TRITON_INTERPRET=1.

Tolerances, as relative errors ‖out − ref‖ / ‖ref‖ of the output and of every gradient, the reference run in
float64 on the same (rounded) inputs:
- float32: 1e-4. The kernels accumulate in fp32 with IEEE dots; what remains is fp32 rounding (~1e-7).
- bfloat16: 1e-2. Outputs and dK/dV are stored in bf16 (8 significant bits: ~2e-3 relative each).
- float64: 1e-10 (the kernels then accumulate in float64).
Inputs are fresh random draws each run; the seed is in every failure message. Every buffer a kernel writes
is allocated NaN-filled, so an element a kernel forgot cannot pass, and NaN never compares as close.
A cell whose keys are all masked has a zero output and zero gradients (defined so in the module). With a
single key the softmax is constant and dq, dk vanish identically: their error is measured against ‖dO‖.
"""

import functools
import logging
import os
import random
import subprocess
import sys

import pytest
import torch
from scldm_kernels import _triton
from scldm_kernels import mcab_attention as ma

from scldm_scale.bench.mcab_attention import bench_mcab_attention

pytestmark = pytest.mark.skipif(not _triton.HAS_TRITON, reason="Triton is not installed")

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float64: 1e-10}
OPS = {"pooling": ma.pooling_attention, "unpooling": ma.unpooling_attention}


@pytest.fixture(autouse=True)
def _poison_kernel_buffers(monkeypatch):
    def nan_filled(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ma, "_empty", nan_filled)


def _relative_error(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """‖out − ref‖ / ‖ref‖ (or / scale when given); inf when out holds a NaN or an infinity."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denominator = ref.norm() if scale is None else scale.double()
    return ((out - ref).norm() / denominator.clamp_min(1e-30)).item()


def _inputs(bsz, n_heads, len_q, len_k, head_dim, dtype, shared_q, masked, seed):
    """q, k, v laid out as the model makes them (k and v: views of one fused projection), a ragged key mask
    with at least one kept key per cell, and a non-contiguous output gradient."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1 if shared_q else bsz, len_q, n_heads * head_dim, generator=gen, dtype=dtype)
    q = q.unflatten(-1, (n_heads, head_dim))  # (Bq, Lq, H, D)
    kv = torch.randn(bsz, len_k, 2 * n_heads * head_dim, generator=gen, dtype=dtype)
    k, v = (t.unflatten(-1, (n_heads, head_dim)) for t in kv.chunk(2, dim=-1))  # (B, Lk, H, D) views
    mask = None
    if masked:
        mask = torch.rand(bsz, len_k, generator=gen) < 0.7
        mask[torch.arange(bsz), torch.randint(0, len_k, (bsz,), generator=gen)] = True
    grad_out = torch.randn(bsz, n_heads, len_q, head_dim, generator=gen, dtype=dtype).transpose(1, 2)
    return q, k, v, mask, grad_out


def _check_against_reference(op, q, k, v, mask, grad_out, seed, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = OPS[op](*leaves, mask, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = ma.attention_reference(*ref_leaves, mask, kwargs.get("scale"))
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    tol = TOLERANCE[q.dtype]
    assert out.dtype == q.dtype and out.shape == ref.shape
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True):
        assert got.shape == want.shape, name
        scale = grad_out.norm() if k.shape[1] == 1 and name in ("dq", "dk") else None
        error = _relative_error(got, want, scale)
        assert error < tol, f"{op} {name}: relative error {error:.2e} >= {tol:.0e} (seed {seed})"


# (op, B, H, Lq, Lk, D, shared q, key mask, num_splits): sizes off the interpreter's 16-wide blocks,
# a query batch of 1 (shared by all cells, as in the model) and of B, forced splits of the long axis.
CASES = [
    ("pooling", 3, 2, 5, 37, 6, True, True, None),
    ("pooling", 2, 3, 1, 50, 16, False, True, 3),
    ("pooling", 2, 1, 7, 1, 3, True, False, None),  # one key
    ("unpooling", 3, 2, 37, 5, 6, True, True, None),
    ("unpooling", 2, 3, 21, 1, 16, False, False, 2),  # one key
    ("unpooling", 3, 1, 40, 3, 8, True, False, 2),
]


@pytest.mark.parametrize(
    ("op", "bsz", "n_heads", "len_q", "len_k", "head_dim", "shared_q", "masked", "splits", "dtype"),
    [(*case, torch.float32) for case in CASES] + [(*CASES[i], torch.bfloat16) for i in (0, 1, 3, 5)],
    ids=lambda value: str(value).removeprefix("torch."),
)
def test_forward_and_gradients_match_float64_reference(
    op, bsz, n_heads, len_q, len_k, head_dim, shared_q, masked, splits, dtype
):
    seed = random.randrange(2**31)
    q, k, v, mask, grad_out = _inputs(bsz, n_heads, len_q, len_k, head_dim, dtype, shared_q, masked, seed)
    _check_against_reference(op, q, k, v, mask, grad_out, seed, num_splits=splits)


@pytest.mark.parametrize("op", ["pooling", "unpooling"])
def test_explicit_scale_and_float64_inputs(op):
    seed = random.randrange(2**31)
    len_q, len_k = (3, 20) if op == "pooling" else (20, 3)
    q, k, v, mask, grad_out = _inputs(2, 2, len_q, len_k, 5, torch.float64, True, True, seed)
    _check_against_reference(op, q, k, v, mask, grad_out, seed, scale=0.3, num_splits=2)


@pytest.mark.parametrize("op", ["pooling", "unpooling"])
def test_a_cell_without_kept_keys_gets_zero_output_and_zero_gradients(op):
    seed = random.randrange(2**31)
    len_q, len_k = (4, 19) if op == "pooling" else (19, 4)
    q, k, v, mask, grad_out = _inputs(3, 2, len_q, len_k, 8, torch.float32, True, True, seed)
    mask[1] = False
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = OPS[op](*leaves, mask, num_splits=2)
    dq, dk, dv = torch.autograd.grad(out, leaves, grad_out)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))
    assert torch.isfinite(dq).all()
    _check_against_reference(op, q, k, v, mask, grad_out, seed, num_splits=2)


@pytest.mark.parametrize("op", ["pooling", "unpooling"])
def test_gradcheck_float64(op):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    len_q, len_k = (2, 19) if op == "pooling" else (19, 2)
    q = torch.randn(1, len_q, 1, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(2, len_k, 1, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(2, len_k, 1, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.ones(2, len_k, dtype=torch.bool)
    mask[0, -1] = False
    op = functools.partial(OPS[op], key_mask=mask, num_splits=2)
    assert torch.autograd.gradcheck(op, (q, k, v), fast_mode=True, check_undefined_grad=False)


def test_validation_names_what_is_wrong():
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(3, 10, 2, 8), torch.randn(3, 10, 2, 8)
    with pytest.raises(ValueError, match=r"q must be \(1 or B=3"):
        ma.pooling_attention(torch.randn(2, 4, 2, 8), k, v)
    with pytest.raises(ValueError, match="one shape"):
        ma.pooling_attention(q, k, v[:, :5])
    with pytest.raises(TypeError, match="must share one of"):
        ma.pooling_attention(q, k, v.double())
    with pytest.raises(ValueError, match="key_mask must be a bool"):
        ma.pooling_attention(q, k, v, torch.ones(3, 10))
    with pytest.raises(ValueError, match="one tile"):
        ma.pooling_attention(torch.randn(1, 200, 2, 8), k, v)
    with pytest.raises(ValueError, match="one tile"):
        ma.unpooling_attention(q, torch.randn(3, 300, 2, 8), torch.randn(3, 300, 2, 8))


def test_unsupported_device_falls_back_to_the_reference_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(_triton, "INTERPRETING", False)  # CPU tensors without the interpreter: no Triton
    monkeypatch.setattr(_triton, "_warned", set())
    q, k, v = torch.randn(1, 3, 2, 4), torch.randn(2, 9, 2, 4), torch.randn(2, 9, 2, 4)
    with caplog.at_level(logging.WARNING, logger="scldm_kernels"):
        out = ma.pooling_attention(q, k, v)
        ma.pooling_attention(q, k, v)
    warnings = [r.getMessage() for r in caplog.records if "PyTorch reference" in r.getMessage()]
    assert len(warnings) == 1 and "pooling_attention" in warnings[0] and "TRITON_INTERPRET=1" in warnings[0]
    torch.testing.assert_close(out, ma.attention_reference(q, k, v))


@pytest.mark.parametrize("fold_pooling", [False, True])
def test_vae_training_step_with_triton_attention_matches_torch(fold_pooling):
    """A SetVAE training step (loss and every parameter's gradient) with MCAB pooling and unpooling on the
    Triton kernels (pooling plain or with its projections folded into the queries) vs SDPA, same weights,
    fp32: relative 1e-4."""
    import numpy as np
    import scipy.sparse as sp

    from scldm_scale.config import VAEConfig
    from scldm_scale.data.batch import collate
    from scldm_scale.models.vae import SetVAE

    seed = random.randrange(2**31)
    rng = np.random.default_rng(seed)
    n_genes = 23
    dense = rng.poisson(3.0, size=(5, n_genes)).astype(np.float32)
    dense *= rng.random((5, n_genes)) < np.linspace(0.2, 0.9, 5)[:, None]  # ragged: real padding
    dense[:, 0] += 1
    batch = collate(sp.csr_matrix(dense), {})
    sizes = dict(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8, mlp_ratio=2.0)
    torch.manual_seed(seed)
    models = {
        "torch": SetVAE(VAEConfig(**sizes), n_genes),
        "triton": SetVAE(VAEConfig(**sizes, attention_backend="triton", fold_pooling=fold_pooling), n_genes),
    }
    models["triton"].load_state_dict(models["torch"].state_dict())
    tol = 1e-4
    losses, grads = {}, {}
    for backend, model in models.items():
        loss, _ = model(batch)
        loss.backward()
        losses[backend], grads[backend] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    assert _relative_error(losses["triton"], losses["torch"]) < tol, f"seed {seed}"
    for name, grad in grads["torch"].items():
        error = _relative_error(grads["triton"][name], grad)
        assert error < tol, f"grad of {name}: relative error {error:.2e} (seed {seed})"


@pytest.mark.parametrize("kind", ["pooling", "unpooling"])
def test_smoke_benchmark_runs_the_kernel_and_a_baseline(kind):
    rows = bench_mcab_attention(kind, smoke=True, backends=("triton", "sdpa_math"))
    assert [(r["backend"], r["pass"]) for r in rows] == [
        (backend, p) for backend in ("triton", "sdpa_math") for p in ("forward", "forward+backward")
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["ms"] > 0 and row["flops"] > 0 and row["bytes"] > 0


def _folded_reference(q, x, mask, scale):
    tokens = x.unsqueeze(2).expand(-1, -1, q.shape[2], -1)  # (B, Lk, H, E): autograd sums dx over heads
    return ma.attention_reference(q, tokens, tokens, mask, scale)


@pytest.mark.parametrize(("dtype", "splits"), [(torch.float32, None), (torch.float32, 2), (torch.bfloat16, None)])
def test_folded_pooling_matches_float64_reference(dtype, splits):
    """Keys = values = the tokens, shared by the heads; one cell has no kept token (zeros, zero gradients)."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    bsz, len_q, n_heads, len_k, dim = 3, 5, 2, 37, 12
    q = torch.randn(1, len_q, n_heads, dim, generator=gen).to(dtype).requires_grad_()
    x = torch.randn(bsz, len_k, dim, generator=gen).to(dtype).requires_grad_()
    mask = torch.rand(bsz, len_k, generator=gen) < 0.7
    mask[0, 0], mask[2] = True, False
    grad_out = torch.randn(bsz, len_q, n_heads, dim, generator=gen).to(dtype)
    out = ma.folded_pooling_attention(q, x, mask, scale=0.4, num_splits=splits)
    grads = torch.autograd.grad(out, (q, x), grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, x)]
    ref = _folded_reference(*ref_leaves, mask, 0.4)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    for name, got, want in zip(("out", "dq", "dx"), (out, *grads), (ref, *ref_grads), strict=True):
        error = _relative_error(got, want)
        assert error < TOLERANCE[dtype], f"{name}: relative error {error:.2e} (seed {seed})"
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.equal(grads[1][2], torch.zeros_like(x[2]))


def test_folded_pooling_gradcheck_float64():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    q = torch.randn(1, 2, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 19, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, :5] = False
    op = functools.partial(ma.folded_pooling_attention, key_mask=mask, scale=0.7)
    assert torch.autograd.gradcheck(op, (q, x), fast_mode=True, check_undefined_grad=False)


def test_mcab_with_folded_kv_projections_matches_sdpa():
    """MCAB pooling with W_k folded into the queries and W_v applied after the sum: same output and gradients
    (every weight, the inducing points, the tokens) as the SDPA block with the same weights; fp32, 1e-4."""
    from scldm_scale.models.mcab import MCAB

    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    blocks = {kernel: MCAB(16, 2, 2.0, kernel=kernel) for kernel in (None, "pooling_folded")}
    blocks["pooling_folded"].load_state_dict(blocks[None].state_dict())
    queries = torch.randn(1, 4, 16)
    tokens = torch.randn(3, 29, 16)
    mask = torch.arange(29)[None] < torch.tensor([[29], [11], [1]])
    results = {}
    for kernel, block in blocks.items():
        inputs = [queries.clone().requires_grad_(), tokens.clone().requires_grad_()]
        out = block(inputs[0], inputs[1], mask)
        leaves = [*inputs, *block.parameters()]
        results[kernel] = (out, torch.autograd.grad(out, leaves, torch.ones_like(out)))
    assert _relative_error(results["pooling_folded"][0], results[None][0]) < 1e-4, f"seed {seed}"
    for i, (got, want) in enumerate(zip(results["pooling_folded"][1], results[None][1], strict=True)):
        assert _relative_error(got, want) < 1e-4, f"gradient {i} (seed {seed})"


COMPILE_SCRIPT = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from scldm_kernels import mcab_attention as ma

ACC_POINTERS = {"LSE", "DQP", "OP", "LSEP", "DKP", "DVP"}  # fp32 buffers; every other pointer is bf16 data
common = dict(HAS_MASK=True, DOT=tl.bfloat16, ACC=tl.float32, PRECISION="tf32")
pooling = dict(common, BLOCK_Q=32, BLOCK_K=64, BLOCK_D=64)
unpooling = dict(common, BLOCK_Q=64, BLOCK_K=32, BLOCK_D=64)
for kernel, constexprs in (
    (ma._pool_fwd_kernel, pooling),
    (ma._pool_combine_kernel, dict(ACC=tl.float32, BLOCK_Q=32, BLOCK_D=64)),
    (ma._pool_bwd_kernel, dict(pooling, WRITE_KV=True)),
    (ma._pool_bwd_kernel, dict(pooling, WRITE_KV=False)),
    (ma._folded_pool_bwd_dx_kernel, dict(common, BLOCK_Q=32, BLOCK_K=32, BLOCK_D=128)),
    (ma._unpool_fwd_kernel, unpooling),
    (ma._unpool_bwd_kv_kernel, unpooling),
    (ma._unpool_bwd_q_kernel, unpooling),
):
    jit_fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature = {}
    for name in jit_fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper():
            signature[name] = "*u8" if name == "MASK" else "*fp32" if name in ACC_POINTERS else "*bf16"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    compiled = triton.compile(ASTSource(jit_fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in compiled.asm, jit_fn.__name__
"""


def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs Python, so code the compiler rejects can pass every test above: compile each kernel
    (bf16, the training dtype) for an H100, sm_90 PTX and cubin, in a process without the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
