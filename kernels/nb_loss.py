"""Fused negative-binomial NLL over cells x genes, with the mean a softmax over genes times the library size.

For cell b, gene g (z logits, x counts, L library size, theta = exp(log_theta), lse = logsumexp_g z):
    log mu = log L + z - lse,    p = mu / (theta + mu)
    log NB = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) + theta log(1 - p) + x log p
    nll_b  = -sum_g log NB
Gradients, with a_g = d log NB / d log mu_g = x (1 - p) - theta p and A_b = sum_g a_g:
    d nll_b / d z_g         = softmax_g A_b - a_g       (d log mu_g / d z_k = [g = k] - softmax_k)
    d nll_b / d log theta_g = a_g - theta (log(1 - p) + psi(x + theta) - psi(theta))
So the logit gradient needs one row sum, A_b, and the log-normaliser lse: both are known after the forward.

Passes over [B, G] (no softmax, mean or other [B, G] temporary is ever written):
1. `_row_stats_kernel`, grid (B, n_split): running max and sum of exp over one chunk of a row's genes.
2. `_nll_forward_kernel`, same grid: combines the chunks' stats into lse, then the chunk's NLL and its
   part of A_b. A costs nothing here and spares the backward a pass of its own.
3. `_nll_backward_kernel`, grid (gene blocks, cell groups): d logits and d log theta with the incoming
   gradient per cell. Per-gene theta: each program sums its cells' d log theta in registers and writes one
   (groups, G) partial row, summed afterwards: deterministic, no atomics.
The gradients are not written in the forward (as Liger's cross-entropy does): the gradient per cell is
unknown until the backward, and per-gene d log theta must be weighted by it before the sum over cells.

Numerics: fp32 (fp64 for fp64 inputs) whatever the input dtype. lgamma(x + theta) - lgamma(x + 1) for
counts of 1e4-1e5 is one stable difference (`lgamma_diff`), not two lgammas of ~1e6 whose fp32 rounding
alone is ~0.1; log p and log(1 - p) are softplus of log theta - log mu; psi(x + theta) - psi(theta) likewise.

The model passes log theta, not theta: the head parameterises theta by its log, and its gradient comes
out directly. Library size and counts are data: no gradient.

The benchmark against the eager reference is `scldm_scale/bench/nb_loss.py` (`scldm-scale bench kernels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import (
    HAS_TRITON,
    INTERPRETING,
    autotune_configs,
    kernel_unavailable_reason,
    tl,
    triton,
    warn_fallback_once,
)

if HAS_TRITON:
    from ._triton import digamma_diff, lgamma, lgamma_diff, softplus

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_COUNT_DTYPES = (torch.float32, torch.float64, torch.int16, torch.int32, torch.int64, torch.uint8)


def nb_nll_reference(
    logits: torch.Tensor, library_size: torch.Tensor, log_theta: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """NB negative log-likelihood per cell, (B,), in PyTorch: fp32 math (fp64 for fp64 logits).

    logits (B, G), library_size (B,), log_theta (G,) or (B, G), counts (B, G).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = counts.to(dtype)
    log_theta = log_theta.to(dtype)
    theta = log_theta.exp()
    log_mu = library_size.to(dtype).log()[:, None] + logits.to(dtype).log_softmax(-1)  # (B, G)
    log_p = F.logsigmoid(log_mu - log_theta)  # (B, G) log mu / (theta + mu)
    log_1mp = F.logsigmoid(log_theta - log_mu)  # (B, G) log theta / (theta + mu)
    log_pmf = torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0) + theta * log_1mp + x * log_p
    return -log_pmf.sum(-1)


# A compiled caller breaks its graph here and runs the kernels as they are: dynamo would trace into the
# launchers and, under TRITON_INTERPRET=1, into the interpreter, which it cannot.
@torch.compiler.disable
def nb_nll(
    logits: torch.Tensor, library_size: torch.Tensor, log_theta: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """NB negative log-likelihood per cell, (B,), fused; differentiable in logits and log_theta.

    logits (B, G) fp32/bf16/fp64; library_size (B,) > 0; log_theta (G,) per gene or (B, G) per cell,
    fp32/bf16/fp64; counts (B, G) fp32/fp64 or integers. The result is fp32 (fp64 for fp64 logits); the
    gradients take the dtype of their input. Falls back to `nb_nll_reference`, with one warning, where the
    kernel cannot run (no Triton; CPU tensors without TRITON_INTERPRET=1).
    """
    _check_inputs(logits, library_size, log_theta, counts)
    reason = kernel_unavailable_reason(logits, library_size, log_theta, counts)
    if reason is not None:
        warn_fallback_once("nb_nll", reason)
        return nb_nll_reference(logits, library_size, log_theta, counts)
    return NBNLLFunction.apply(logits, library_size, log_theta, counts)


def _check_inputs(logits, library_size, log_theta, counts) -> None:
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"nb_nll: logits must be (cells, genes) with both > 0, got shape {tuple(logits.shape)}")
    n_cells, n_genes = logits.shape
    expected = {
        "library_size": ((n_cells,),),
        "log_theta": ((n_genes,), (n_cells, n_genes)),
        "counts": ((n_cells, n_genes),),
    }
    for name, tensor in (("library_size", library_size), ("log_theta", log_theta), ("counts", counts)):
        if tuple(tensor.shape) not in expected[name]:
            allowed = " or ".join(str(s) for s in expected[name])
            raise ValueError(
                f"nb_nll: {name} must have shape {allowed} for logits {tuple(logits.shape)}, got {tuple(tensor.shape)}"
            )
    for name, tensor in (("logits", logits), ("log_theta", log_theta)):
        if tensor.dtype not in _LOGIT_DTYPES:
            raise TypeError(f"nb_nll: {name} must be float32, bfloat16 or float64, got {tensor.dtype}")
    if not library_size.is_floating_point():
        raise TypeError(f"nb_nll: library_size must be floating point, got {library_size.dtype}")
    if counts.dtype not in _COUNT_DTYPES:
        raise TypeError(
            f"nb_nll: counts must be float32, float64 or an integer dtype, got {counts.dtype} "
            "(16-bit floats hold integers exactly only up to 256 or 2048)"
        )
    devices = {t.device for t in (logits, library_size, log_theta, counts)}
    if len(devices) > 1:
        raise ValueError(f"nb_nll: all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    for name, tensor in (("logits", logits), ("log_theta", log_theta), ("counts", counts)):
        if not tensor.is_contiguous():
            raise ValueError(f"nb_nll: {name} must be contiguous (strides {tensor.stride()}); call .contiguous() first")
    for name, tensor in (("library_size", library_size), ("counts", counts)):
        if tensor.requires_grad:
            raise ValueError(f"nb_nll: {name} is data and gets no gradient, but it requires grad; detach it")


class NBNLLFunction(torch.autograd.Function):
    """(logits, library_size, log_theta, counts) -> NLL per cell; gradients for logits and log_theta.

    Saves the inputs plus two per-cell vectors (lse, and A_b's chunk partials): nothing of size [B, G].
    """

    @staticmethod
    def forward(ctx, logits, library_size, log_theta, counts):
        nll, lse, part_a = _forward(logits, library_size, log_theta, counts)
        ctx.save_for_backward(logits, library_size, log_theta, counts, lse, part_a)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        logits, library_size, log_theta, counts, lse, part_a = ctx.saved_tensors
        dlogits, dlog_theta = _backward(logits, library_size, log_theta, counts, lse, part_a, grad_nll)
        return dlogits, None, dlog_theta, None


def _new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers fill (a seam: the tests poison them with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _target_programs(device: torch.device) -> int:
    """Programs enough to fill the device several times over; few under the interpreter (tests still get
    several chunks per row and several cell groups)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _forward_split(n_cells: int, n_genes: int, device: torch.device) -> tuple[int, int]:
    """(chunk, n_split): each row's genes cut into n_split non-empty chunks when there are too few rows to
    fill the device alone; chunks of at least min_chunk genes keep each program streaming."""
    min_chunk = 32 if INTERPRETING else 2048
    n_split = max(1, min(triton.cdiv(_target_programs(device), n_cells), triton.cdiv(n_genes, min_chunk)))
    chunk = triton.cdiv(n_genes, n_split)
    return chunk, triton.cdiv(n_genes, chunk)


def _backward_groups(n_cells: int, n_genes: int, device: torch.device) -> int:
    """Cells per backward program: enough groups that (gene blocks x groups) fills the device, as few as that
    allows, since per-gene theta writes one (groups, G) partial."""
    nominal_block = 64 if INTERPRETING else 1024
    n_groups = min(n_cells, triton.cdiv(_target_programs(device), triton.cdiv(n_genes, nominal_block)))
    return triton.cdiv(n_cells, max(1, n_groups))


def _acc_dtype(logits: torch.Tensor) -> tuple[torch.dtype, object]:
    if logits.dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _forward(logits, library_size, log_theta, counts):
    n_cells, n_genes = logits.shape
    device = logits.device
    acc_torch, acc_tl = _acc_dtype(logits)
    chunk, n_split = _forward_split(n_cells, n_genes, device)
    part_max = _new_buffer((n_cells, n_split), acc_torch, device)
    part_sumexp = _new_buffer((n_cells, n_split), acc_torch, device)
    part_nll = _new_buffer((n_cells, n_split), acc_torch, device)
    part_a = _new_buffer((n_cells, n_split), acc_torch, device)
    lse = _new_buffer((n_cells,), acc_torch, device)
    grid = (n_cells, n_split)
    _row_stats_kernel[grid](logits, logits.stride(0), part_max, part_sumexp, n_genes, chunk, n_split, ACC=acc_tl)
    theta_row_stride = log_theta.stride(0) if log_theta.dim() == 2 else 0
    _nll_forward_kernel[grid](
        logits, logits.stride(0), counts, counts.stride(0), log_theta, theta_row_stride,
        library_size, library_size.stride(0), part_max, part_sumexp, part_nll, part_a, lse,
        n_genes, chunk, n_split, ACC=acc_tl, SPLIT_P2=triton.next_power_of_2(n_split),
    )  # fmt: skip
    nll = part_nll[:, 0] if n_split == 1 else part_nll.sum(1)  # (B,)
    return nll, lse, part_a


def _backward(logits, library_size, log_theta, counts, lse, part_a, grad_nll):
    n_cells, n_genes = logits.shape
    device = logits.device
    acc_torch, acc_tl = _acc_dtype(logits)
    n_split = part_a.shape[1]
    per_cell = log_theta.dim() == 2
    rows_per_program = _backward_groups(n_cells, n_genes, device)
    n_groups = triton.cdiv(n_cells, rows_per_program)
    dlogits = _new_buffer(logits.shape, logits.dtype, device)
    if per_cell:
        dlog_theta = _new_buffer(log_theta.shape, log_theta.dtype, device)
    else:
        dlog_theta = _new_buffer((n_groups, n_genes), acc_torch, device)  # summed over groups below

    def grid(meta):
        return (triton.cdiv(n_genes, meta["BLOCK"]), n_groups)

    _nll_backward_kernel[grid](
        logits, logits.stride(0), counts, counts.stride(0), log_theta, log_theta.stride(0) if per_cell else 0,
        library_size, library_size.stride(0), lse, part_a, grad_nll, grad_nll.stride(0),
        dlogits, dlog_theta, dlog_theta.stride(0), n_cells, n_genes, n_split, rows_per_program,
        ACC=acc_tl, THETA_PER_CELL=per_cell, SPLIT_P2=triton.next_power_of_2(n_split),
    )  # fmt: skip
    if not per_cell:
        dlog_theta = (dlog_theta[0] if n_groups == 1 else dlog_theta.sum(0)).to(log_theta.dtype)  # (G,)
    return dlogits, dlog_theta


if HAS_TRITON:

    @triton.jit
    def _nb_terms(z, x, lt, log_library, lse):
        """Per element: theta, log p, log(1 - p), and a = d log NB / d log mu = x (1 - p) - theta p."""
        log_mu = log_library + z - lse
        d = lt - log_mu
        log_p = -softplus(d)  # log mu / (theta + mu)
        log_q = -softplus(-d)  # log theta / (theta + mu) = log(1 - p)
        theta = tl.exp(lt)
        a = x * tl.exp(log_q) - theta * tl.exp(log_p)
        return theta, log_p, log_q, a

    @triton.jit
    def _log_binomial_term(x, theta):
        """lgamma(x + theta) - lgamma(theta) - lgamma(x + 1): one stable lgamma difference whose base is the
        larger of theta and x + 1, minus the lgamma of the smaller; exactly 0 at x = 0 (most genes)."""
        x1 = x + 1.0
        theta_is_base = theta >= x1
        base = tl.where(theta_is_base, theta, x1)
        step = tl.where(theta_is_base, x, theta - 1.0)
        rest = tl.where(theta_is_base, x1, theta)
        return tl.where(x == 0.0, 0.0, lgamma_diff(base, step) - lgamma(rest))

    @triton.autotune(
        configs=autotune_configs(
            [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))],
            interpreter_config=triton.Config({"BLOCK": 64}),
        ),
        key=["n_genes", "chunk"],
    )
    @triton.jit
    def _row_stats_kernel(
        logits_ptr, stride_logits, part_max_ptr, part_sumexp_ptr, n_genes, chunk, n_split,
        ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Program (row, split): max and sum of exp(z - max) over genes [split * chunk, (split + 1) * chunk).

        logits_ptr: (B, G), row stride stride_logits, unit gene stride; part_*_ptr: (B, n_split), ACC dtype.
        ACC: accumulation dtype (fp32, or fp64 for fp64 inputs). BLOCK: genes per step.
        """
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        first = split * chunk
        row_max = tl.full([], float("-inf"), ACC)
        sumexp = tl.zeros([], ACC)
        for start in range(0, chunk, BLOCK):
            cols = first + start + offs
            ok = (start + offs < chunk) & (cols < n_genes)
            z = tl.load(logits_ptr + row * stride_logits + cols, mask=ok, other=float("-inf")).to(ACC)
            new_max = tl.maximum(row_max, tl.max(z, axis=0))  # finite: every chunk's first step has a gene
            sumexp = sumexp * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            row_max = new_max
        tl.store(part_max_ptr + row * n_split + split, row_max)
        tl.store(part_sumexp_ptr + row * n_split + split, sumexp)

    @triton.autotune(
        configs=autotune_configs(
            [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((512, 4), (1024, 4), (1024, 8), (2048, 8))],
            interpreter_config=triton.Config({"BLOCK": 64}),
        ),
        key=["n_genes", "chunk"],
    )
    @triton.jit
    def _nll_forward_kernel(
        logits_ptr, stride_logits, counts_ptr, stride_counts, log_theta_ptr, stride_log_theta,
        library_ptr, stride_library, part_max_ptr, part_sumexp_ptr, part_nll_ptr, part_a_ptr, lse_ptr,
        n_genes, chunk, n_split, ACC: tl.constexpr, SPLIT_P2: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Program (row, split): the chunk's NLL and its part of A_b = sum_g a_g; split 0 also writes lse.

        logits/counts_ptr: (B, G) with row strides; log_theta_ptr: (B, G), or (G,) with stride_log_theta 0;
        library_ptr: (B,); part_max/part_sumexp_ptr: the stats of all n_split chunks of each row (read);
        part_nll/part_a_ptr: (B, n_split), lse_ptr: (B,) (written). SPLIT_P2: n_split rounded up to 2^k.
        """
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        split_offs = tl.arange(0, SPLIT_P2)
        split_ok = split_offs < n_split
        chunk_max = tl.load(part_max_ptr + row * n_split + split_offs, mask=split_ok, other=float("-inf"))
        chunk_sumexp = tl.load(part_sumexp_ptr + row * n_split + split_offs, mask=split_ok, other=0.0)
        row_max = tl.max(chunk_max, axis=0)
        lse = row_max + tl.log(tl.sum(chunk_sumexp * tl.exp(chunk_max - row_max), axis=0))
        log_library = tl.log(tl.load(library_ptr + row * stride_library).to(ACC))
        offs = tl.arange(0, BLOCK)
        first = split * chunk
        nll = tl.zeros([], ACC)
        a_sum = tl.zeros([], ACC)
        for start in range(0, chunk, BLOCK):
            cols = first + start + offs
            ok = (start + offs < chunk) & (cols < n_genes)
            z = tl.load(logits_ptr + row * stride_logits + cols, mask=ok, other=0.0).to(ACC)
            x = tl.load(counts_ptr + row * stride_counts + cols, mask=ok, other=0.0).to(ACC)
            lt = tl.load(log_theta_ptr + row * stride_log_theta + cols, mask=ok, other=0.0).to(ACC)
            theta, log_p, log_q, a = _nb_terms(z, x, lt, log_library, lse)
            log_pmf = _log_binomial_term(x, theta) + theta * log_q + x * log_p
            nll -= tl.sum(tl.where(ok, log_pmf, 0.0), axis=0)
            a_sum += tl.sum(tl.where(ok, a, 0.0), axis=0)
        tl.store(part_nll_ptr + row * n_split + split, nll)
        tl.store(part_a_ptr + row * n_split + split, a_sum)
        if split == 0:
            tl.store(lse_ptr + row, lse)

    @triton.autotune(
        configs=autotune_configs(
            [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((512, 4), (1024, 4), (1024, 8), (2048, 8))],
            interpreter_config=triton.Config({"BLOCK": 64}),
        ),
        key=["n_genes", "n_cells", "rows_per_program"],
    )
    @triton.jit
    def _nll_backward_kernel(
        logits_ptr, stride_logits, counts_ptr, stride_counts, log_theta_ptr, stride_log_theta,
        library_ptr, stride_library, lse_ptr, part_a_ptr, grad_nll_ptr, stride_grad_nll,
        dlogits_ptr, dlog_theta_ptr, stride_dlog_theta, n_cells, n_genes, n_split, rows_per_program,
        ACC: tl.constexpr, THETA_PER_CELL: tl.constexpr, SPLIT_P2: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Program (gene block, cell group): d logits and d log theta for BLOCK genes of rows_per_program cells.

        Inputs as in the forward, plus lse_ptr (B,), part_a_ptr (B, n_split) and grad_nll_ptr (B,) (any
        stride: the gradient of a mean arrives expanded). dlogits_ptr: (B, G), contiguous like logits.
        THETA_PER_CELL: dlog_theta_ptr is (B, G); else it is (groups, G), this group's sum over its cells.
        """
        block = tl.program_id(0)
        group = tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < n_genes
        split_offs = tl.arange(0, SPLIT_P2)
        dlt_sum = tl.zeros([BLOCK], ACC)
        lt = tl.zeros([BLOCK], ACC)
        if not THETA_PER_CELL:
            lt = tl.load(log_theta_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        first = group.to(tl.int64) * rows_per_program
        for i in range(0, tl.minimum(rows_per_program, n_cells - first)):
            row = first + i
            z = tl.load(logits_ptr + row * stride_logits + cols, mask=col_ok, other=0.0).to(ACC)
            x = tl.load(counts_ptr + row * stride_counts + cols, mask=col_ok, other=0.0).to(ACC)
            if THETA_PER_CELL:
                lt = tl.load(log_theta_ptr + row * stride_log_theta + cols, mask=col_ok, other=0.0).to(ACC)
            lse = tl.load(lse_ptr + row)
            a_row = tl.sum(tl.load(part_a_ptr + row * n_split + split_offs, mask=split_offs < n_split, other=0.0))
            grad = tl.load(grad_nll_ptr + row * stride_grad_nll).to(ACC)
            log_library = tl.log(tl.load(library_ptr + row * stride_library).to(ACC))
            theta, log_p, log_q, a = _nb_terms(z, x, lt, log_library, lse)
            dz = grad * (tl.exp(z - lse) * a_row - a)
            dlt = grad * (a - theta * (log_q + digamma_diff(theta, x)))
            tl.store(dlogits_ptr + row * stride_logits + cols, dz.to(dlogits_ptr.dtype.element_ty), mask=col_ok)
            if THETA_PER_CELL:
                out = dlog_theta_ptr + row * stride_dlog_theta + cols
                tl.store(out, dlt.to(dlog_theta_ptr.dtype.element_ty), mask=col_ok)
            else:
                dlt_sum += tl.where(col_ok, dlt, 0.0)
        if not THETA_PER_CELL:
            tl.store(dlog_theta_ptr + group * stride_dlog_theta + cols, dlt_sum, mask=col_ok)
