"""The fused NB loss kernel (`scldm_kernels.nb_loss`) against its eager PyTorch reference, forward and
forward+backward, with the minimal bytes any implementation must move (the loss is bound by memory: its
FLOPs are elementwise special functions and are not counted)."""

from __future__ import annotations

import functools

import torch

from scldm_scale.bench.timing import peak_memory_mib, time_ms


def nb_loss_inputs(
    cells: int, genes: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator, theta_per_cell: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (logits (B, G), library_size (B,), log_theta (G,) or (B, G), counts (B, G)) for `nb_nll`;
    logits and log theta require grad, counts are Poisson with a mean of 1 (most genes 0 or 1)."""
    logits = torch.randn(cells, genes, generator=generator, device=device).to(dtype).requires_grad_()
    theta_shape = (cells, genes) if theta_per_cell else (genes,)
    log_theta = torch.randn(theta_shape, generator=generator, device=device).to(dtype).requires_grad_()
    library_size = torch.full((cells,), 1e4, device=device)
    counts = torch.poisson(torch.rand(cells, genes, generator=generator, device=device) * 2.0, generator=generator)
    return logits, library_size, log_theta, counts


def bench_nb_loss(
    shapes: tuple[tuple[int, int], ...] = ((256, 20_000),),
    dtype: torch.dtype = torch.bfloat16,
    theta_per_cell: bool = False,
    device: str | torch.device | None = None,
    warmup: int = 5,
    reps: int = 20,
) -> list[dict]:
    """Time the fused kernel against the eager reference, forward and forward+backward, per (cells, genes).

    Returns one record per (shape, impl, pass): median milliseconds (`time_ms`), GB/s over the minimal bytes,
    and on CUDA the peak memory of a call above what was allocated before it (inputs excluded). Minimal bytes:
    every input read once, every output written once, which any implementation must move:
        forward          = B*G*(s_logits + s_counts) + T*s_theta + B*(s_library + 4)
        forward+backward = forward + B*G*s_logits + T*s_theta + 4*B   (d logits, d log theta; grad in)
    with s_* the element sizes and T = G (per-gene theta) or B*G (per cell). The fused kernels move more
    (logits 3 times, counts and theta twice), so even they stay below this bound.
    The fused impl is skipped (with a note) where the kernel cannot run; on the CPU it needs
    TRITON_INTERPRET=1 and tiny shapes (a smoke run, not a measurement).
    """
    from scldm_kernels._triton import kernel_unavailable_reason
    from scldm_kernels.nb_loss import NBNLLFunction, nb_nll, nb_nll_reference

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    records = []
    for n_cells, n_genes in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        inputs = nb_loss_inputs(n_cells, n_genes, dtype, device, gen, theta_per_cell)
        logits, _, log_theta, _ = inputs
        theta_bytes = log_theta.numel() * log_theta.element_size()
        forward_bytes = n_cells * n_genes * (logits.element_size() + 4) + theta_bytes + n_cells * 8
        backward_bytes = n_cells * n_genes * logits.element_size() + theta_bytes + n_cells * 4
        reason = kernel_unavailable_reason(*inputs)
        if reason is None:
            nb_nll(*inputs)  # validates once; the timed calls go straight to the kernels
        passes = (("forward", forward_bytes, False), ("forward+backward", forward_bytes + backward_bytes, True))
        for impl, fn in (("fused", NBNLLFunction.apply), ("eager", nb_nll_reference)):
            for pass_name, n_bytes, backward in passes:
                record = dict(
                    op="nb_loss", impl=impl, passes=pass_name, cells=n_cells, genes=n_genes, dtype=str(dtype),
                    theta="cell" if theta_per_cell else "gene", device=str(device), min_bytes=n_bytes,
                )  # fmt: skip
                if impl == "fused" and reason is not None:
                    records.append({**record, "note": f"skipped: {reason}"})
                    continue
                step = functools.partial(_nll_step, fn, inputs, backward)
                ms, peak = time_ms(step, device, warmup, reps), peak_memory_mib(step, device)
                records.append({**record, "ms": ms, "gb_per_s": n_bytes / ms / 1e6, "peak_mib": peak})
    return records


def _nll_step(fn, inputs: tuple[torch.Tensor, ...], backward: bool) -> None:
    nll = fn(*inputs)
    if backward:
        logits, _, log_theta, _ = inputs
        torch.autograd.grad(nll.sum(), (logits, log_theta))
