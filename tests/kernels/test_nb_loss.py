"""Fused NB loss (scldm_kernels.nb_loss) against its PyTorch reference in float64, forward and both gradients.

Inputs are fresh each run (the seed is in every failure message). Every buffer the launchers allocate is
poisoned with NaN, so an element the kernels forget to write fails the comparison (NaN never passes).
Tolerances on ||out - ref|| / ||ref||:
- fp32 inputs, 1e-4: the kernels compute in fp32, whose rounding in lgamma/digamma is ~1e-6 relative;
  measured 1e-7 to 2e-5 (the latter for per-gene log theta gradients with theta up to e^10).
- bf16 inputs, 1e-2: the kernels compute in fp32 from the bf16 values, but return bf16 gradients,
  rounded to 2^-8 relative.
"""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.special import digamma as scipy_digamma
from scipy.special import gammaln
from scipy.stats import nbinom
from scldm_kernels import _triton, nb_loss
from scldm_kernels.nb_loss import NBNLLFunction, nb_nll, nb_nll_reference

from scldm_scale.config import VAEConfig
from scldm_scale.data.batch import collate
from scldm_scale.models.vae import SetVAE

triton = pytest.importorskip("triton")
tl = triton.language

DEVICE = "cpu" if _triton.INTERPRETING or not torch.cuda.is_available() else "cuda"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(nb_loss, "_new_buffer", nan_buffer)


@pytest.fixture
def seed() -> int:
    return random.randrange(2**31)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; absolute where ref is exactly 0 (d logits of a single gene)."""
    diff = (out.double().cpu() - ref.cpu()).norm()
    return (diff if ref.norm() == 0 else diff / ref.norm()).item()


def _nb_inputs(n_cells, n_genes, seed, per_cell_theta, log_theta_range=(-2.0, 3.0), large_counts=False):
    """Float64 logits, library size, log theta, and counts drawn from an NB near the logits' mean.

    large_counts: library sizes ~3e5 and a tenth of the genes with counts of 1e4-1e5.
    """
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((n_cells, n_genes))
    library_size = rng.uniform(5e2, 5e3, n_cells) * (100.0 if large_counts else 1.0)
    log_theta = rng.uniform(*log_theta_range, (n_cells, n_genes) if per_cell_theta else n_genes)
    noisy = logits + 0.5 * rng.standard_normal((n_cells, n_genes))
    mu = library_size[:, None] * np.exp(noisy) / np.exp(noisy).sum(-1, keepdims=True)  # (B, G)
    theta = np.exp(log_theta)
    counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float64)  # numpy's NB has mean mu
    if large_counts:
        n_large = max(1, n_genes // 10)
        counts[:, :n_large] = rng.integers(10_000, 100_000, (n_cells, n_large))
    return tuple(torch.from_numpy(a) for a in (logits, library_size, log_theta, counts))


def _check_against_reference(logits, library_size, log_theta, counts, dtype, seed, mean_reduction=False):
    """Kernel on (logits, log_theta) in dtype vs the float64 reference on the same rounded values."""
    logits = logits.to(dtype).to(DEVICE).requires_grad_()
    log_theta = log_theta.to(dtype).to(DEVICE).requires_grad_()
    library_size = library_size.float().to(DEVICE)
    counts = counts.float().to(DEVICE)
    logits64 = logits.detach().double().requires_grad_()
    log_theta64 = log_theta.detach().double().requires_grad_()
    weights = torch.randn(logits.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    weights = weights.to(DEVICE)

    out = nb_nll(logits, library_size, log_theta, counts)
    ref = nb_nll_reference(logits64, library_size.double(), log_theta64, counts.double())
    if mean_reduction:  # the gradient arrives expanded (stride 0), as from the model's .mean()
        out.mean().backward()
        ref.mean().backward()
    else:
        (out * weights.float()).sum().backward()
        (ref * weights).sum().backward()

    # Eager PyTorch in the same dtype: where a value is itself ill-conditioned (d log theta of one element is
    # a small difference of digamma and log terms), no fp32 computation gets within 1e-4; the kernel must
    # then be no worse than twice eager's error.
    eager_leaves = [t.detach().clone().requires_grad_() for t in (logits, log_theta)]
    eager = nb_nll_reference(eager_leaves[0].float(), library_size, eager_leaves[1].float(), counts)
    (eager.mean() if mean_reduction else (eager * weights.float()).sum()).backward()

    tol = TOLERANCE[dtype]
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert logits.grad.dtype == dtype and log_theta.grad.dtype == dtype
    for name, got, expected, baseline in (
        ("nll", out, ref, eager),
        ("d logits", logits.grad, logits64.grad, eager_leaves[0].grad),
        ("d log theta", log_theta.grad, log_theta64.grad, eager_leaves[1].grad),
    ):
        err = _relative_error(got, expected)
        bound = max(tol, 2 * _relative_error(baseline, expected)) if dtype == torch.float32 else tol
        assert err < bound, f"{name}: relative error {err:.2e} >= {bound:.1e} (seed {seed}, {dtype})"


# Shapes: one cell and one gene; primes; rows cut into several chunks and cells into several groups
# (the interpreter targets 8 programs, with blocks of 64 genes).
SHAPES = [(1, 1), (1, 67), (3, 130), (7, 33), (2, 301)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("per_cell_theta", [False, True], ids=["theta_gene", "theta_cell"])
def test_matches_float64_reference_fp32(shape, per_cell_theta, seed):
    inputs = _nb_inputs(*shape, seed, per_cell_theta)
    _check_against_reference(*inputs, torch.float32, seed)


@pytest.mark.parametrize("per_cell_theta", [False, True], ids=["theta_gene", "theta_cell"])
def test_matches_float64_reference_bf16(per_cell_theta, seed):
    inputs = _nb_inputs(5, 131, seed, per_cell_theta)
    _check_against_reference(*inputs, torch.bfloat16, seed)


@pytest.mark.parametrize("per_cell_theta", [False, True], ids=["theta_gene", "theta_cell"])
def test_large_counts_and_extreme_theta(per_cell_theta, seed):
    """Counts of 1e4-1e5 and theta over the head's whole clamp range [e^-10, e^10]: eager fp32 loses ~1e-2
    on the log theta gradient here (lgammas of ~1e6); the kernel's stable differences keep 1e-4."""
    inputs = _nb_inputs(4, 97, seed, per_cell_theta, log_theta_range=(-10.0, 10.0), large_counts=True)
    _check_against_reference(*inputs, torch.float32, seed)


def test_gradient_of_a_mean_arrives_expanded(seed):
    inputs = _nb_inputs(6, 45, seed, per_cell_theta=False)
    _check_against_reference(*inputs, torch.float32, seed, mean_reduction=True)


@pytest.mark.parametrize("per_cell_theta", [False, True], ids=["theta_gene", "theta_cell"])
def test_gradcheck_float64(per_cell_theta, seed):
    """In float64 the kernels compute in float64, so finite differences check the analytic gradients."""
    logits, library_size, log_theta, counts = _nb_inputs(2, 3, seed, per_cell_theta)
    logits = logits.to(DEVICE).requires_grad_()
    log_theta = log_theta.to(DEVICE).requires_grad_()
    args = (logits, library_size.to(DEVICE), log_theta, counts.to(DEVICE))
    assert torch.autograd.gradcheck(NBNLLFunction.apply, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_reference_matches_scipy(seed):
    """The reference itself against scipy's NB pmf (n = theta, p = theta / (theta + mu)), in float64."""
    logits, library_size, log_theta, counts = _nb_inputs(3, 40, seed, per_cell_theta=True, large_counts=True)
    mu = (library_size[:, None] * logits.softmax(-1)).numpy()
    theta = log_theta.exp().numpy()
    expected = -nbinom.logpmf(counts.numpy(), theta, theta / (theta + mu)).sum(-1)
    got = nb_nll_reference(logits, library_size, log_theta, counts).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_integer_counts_and_no_grad_inputs(seed):
    inputs = _nb_inputs(3, 50, seed, per_cell_theta=False)
    logits, library_size, log_theta, counts = (t.float().to(DEVICE) for t in inputs)
    got = nb_nll(logits, library_size, log_theta, counts.long())
    expected = nb_nll_reference(logits.double(), library_size.double(), log_theta.double(), counts.double())
    assert _relative_error(got, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "logits": a["logits"][0]}, ValueError, "logits must be \\(cells, genes\\)"),
        (lambda a: {**a, "library_size": a["library_size"][:2]}, ValueError, "library_size must have shape"),
        (lambda a: {**a, "log_theta": a["log_theta"][:5]}, ValueError, "log_theta must have shape"),
        (lambda a: {**a, "counts": a["counts"].bfloat16()}, TypeError, "counts must be float32"),
        (lambda a: {**a, "logits": a["logits"].half()}, TypeError, "logits must be float32, bfloat16"),
        (lambda a: {**a, "library_size": a["library_size"].long()}, TypeError, "library_size must be floating"),
        (lambda a: {**a, "counts": a["counts"].t().contiguous().t()}, ValueError, "counts must be contiguous"),
        (lambda a: {**a, "counts": a["counts"].to("meta")}, ValueError, "one device"),
        (lambda a: {**a, "counts": a["counts"].requires_grad_()}, ValueError, "counts is data"),
    ],
)
def test_invalid_inputs_are_named(change, error, match):
    args = dict(logits=torch.randn(3, 7), library_size=torch.full((3,), 100.0), log_theta=torch.zeros(7))
    args["counts"] = torch.ones(3, 7)
    with pytest.raises(error, match=match):
        nb_nll(**change(args))


def test_fallback_warns_once_and_runs_the_reference(monkeypatch, caplog, seed):
    monkeypatch.setattr(nb_loss, "kernel_unavailable_reason", lambda *tensors: "no kernel in this test")
    monkeypatch.setattr(_triton, "_warned", set())
    logits, library_size, log_theta, counts = (t.float() for t in _nb_inputs(2, 9, seed, per_cell_theta=False))
    with caplog.at_level("WARNING", logger="scldm_kernels"):
        first = nb_nll(logits, library_size, log_theta, counts)
        nb_nll(logits, library_size, log_theta, counts)
    warnings = [r.getMessage() for r in caplog.records if "no kernel in this test" in r.getMessage()]
    assert len(warnings) == 1 and "falls back to its PyTorch reference" in warnings[0]
    torch.testing.assert_close(first, nb_nll_reference(logits, library_size, log_theta, counts))


def test_kernel_availability_by_device():
    cpu = torch.zeros(1)
    assert (_triton.kernel_unavailable_reason(cpu) is None) == _triton.INTERPRETING
    assert "meta" in _triton.kernel_unavailable_reason(cpu.to("meta"))


@pytest.mark.parametrize("theta_mode", ["gene", "cell"])
def test_vae_step_triton_backend_matches_torch(theta_mode):
    """A SetVAE training step: loss, metrics and every parameter gradient equal across the two backends."""
    n_genes = 37
    base = dict(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8, mlp_ratio=2.0)
    torch.manual_seed(random.randrange(2**31))
    models = {}
    for backend in ("torch", "triton"):
        models[backend] = SetVAE(VAEConfig(**base, theta_mode=theta_mode, nb_loss_backend=backend), n_genes)
    models["triton"].load_state_dict(models["torch"].state_dict())
    with torch.no_grad():  # log theta spread around 0 (std ~0.4), away from its initial theta = 1
        for name, param in models["torch"].named_parameters():
            if "theta" in name:
                param.normal_(0.0, 0.4 if name.endswith("log_theta") else 0.1)
        models["triton"].load_state_dict(models["torch"].state_dict())
    rng = np.random.default_rng(random.randrange(2**31))
    dense = rng.negative_binomial(2.0, 0.2, size=(9, n_genes)).astype(np.float32)
    dense[:, 0] += 1  # no empty cells
    batch = collate(sp.csr_matrix(dense), {}).to(DEVICE)
    results = {}
    for backend, model in models.items():
        model.to(DEVICE)
        loss, metrics = model(batch)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results[backend] = (loss, metrics, grads)
    loss_torch, metrics_torch, grads_torch = results["torch"]
    loss_triton, metrics_triton, grads_triton = results["triton"]
    assert _relative_error(loss_triton, loss_torch.double()) < 1e-5
    assert metrics_triton.keys() == metrics_torch.keys()
    assert grads_triton.keys() == grads_torch.keys()
    for name, grad in grads_torch.items():
        err = _relative_error(grads_triton[name], grad.double())
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


@triton.jit
def _special_functions_kernel(z_ptr, d_ptr, x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out rows: lgamma(z), digamma(z), lgamma_diff(z, d), digamma_diff(z, x)."""
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    z = tl.load(z_ptr + offs, mask=ok, other=1.0)
    d = tl.load(d_ptr + offs, mask=ok, other=0.0)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, _triton.lgamma(z), mask=ok)
    tl.store(out_ptr + n + offs, _triton.digamma(z), mask=ok)
    tl.store(out_ptr + 2 * n + offs, _triton.lgamma_diff(z, d), mask=ok)
    tl.store(out_ptr + 3 * n + offs, _triton.digamma_diff(z, x), mask=ok)


def test_special_functions_match_scipy(seed):
    """The plain-tl lgamma/digamma over theta's and counts' whole range (4.5e-5 to 2e5), and the stable
    differences: their error scales with the difference, not with the two lgammas of up to ~2e6.
    digamma_diff(theta, x) is checked for counts x, the only steps the loss takes (a tiny non-integer step
    from a tiny theta would cancel: psi(theta + x) - psi(theta) ~ x / theta^2 there)."""
    rng = np.random.default_rng(seed)
    n = 2000
    z = np.exp(rng.uniform(np.log(4.5e-5), np.log(2e5), n)).astype(np.float32)
    d = z * rng.uniform(-0.999, 1.0, n)
    d = np.where((rng.random(n) < 0.3) & (z + np.round(d) > 0), np.round(d), d).astype(np.float32)
    x = np.round(np.exp(rng.uniform(0.0, np.log(1e5), n)) * (rng.random(n) < 0.8)).astype(np.float32)
    out = torch.full((4 * n,), float("nan"), device=DEVICE)
    inputs = (torch.from_numpy(a).to(DEVICE) for a in (z, d, x))
    _special_functions_kernel[(1,)](*inputs, out, n, BLOCK=2048)
    got = out.double().cpu().numpy().reshape(4, n)
    z64, d64, x64 = z.astype(np.float64), d.astype(np.float64), x.astype(np.float64)
    expected = {
        "lgamma": gammaln(z64),
        "digamma": scipy_digamma(z64),
        "lgamma_diff": gammaln(z64 + d64) - gammaln(z64),
        "digamma_diff": scipy_digamma(z64 + x64) - scipy_digamma(z64),
    }
    for row, (name, ref) in enumerate(expected.items()):
        scaled_error = np.abs(got[row] - ref) / np.maximum(1.0, np.abs(ref))
        assert scaled_error.max() < 1e-5, f"{name}: error {scaled_error.max():.1e} (seed {seed})"


COMPILE_SCRIPT = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from scldm_kernels import nb_loss

# bf16 logits and log theta, int64 counts, fp32 accumulators and outputs; one block size per kernel.
pointer_types = {"logits_ptr": "*bf16", "log_theta_ptr": "*bf16", "counts_ptr": "*i64", "dlogits_ptr": "*bf16"}
for kernel, constexprs in (
    (nb_loss._row_stats_kernel, {"ACC": tl.float32, "BLOCK": 1024}),
    (nb_loss._nll_forward_kernel, {"ACC": tl.float32, "SPLIT_P2": 4, "BLOCK": 1024}),
    (nb_loss._nll_backward_kernel, {"ACC": tl.float32, "THETA_PER_CELL": False, "SPLIT_P2": 4, "BLOCK": 1024}),
    (nb_loss._nll_backward_kernel, {"ACC": tl.float32, "THETA_PER_CELL": True, "SPLIT_P2": 1, "BLOCK": 512}),
):
    jit_fn = kernel.fn  # under the autotuner
    signature = {name: "*fp32" if name.endswith("_ptr") else "i32" for name in jit_fn.arg_names}
    signature.update({name: kind for name, kind in pointer_types.items() if name in signature})
    signature.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(jit_fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in compiled.asm, jit_fn.__name__
"""


def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs Python, so code that the compiler rejects (types, constexpr rules) can pass every
    test above: compile each kernel for an H100 (sm_90, PTX and cubin) in a process without the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
