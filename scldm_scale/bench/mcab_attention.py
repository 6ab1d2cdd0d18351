"""The fused MCAB attention kernels (`scldm_kernels.mcab_attention`) against every SDPA backend and compiled
FlexAttention, forward and forward+backward, with the minimal FLOPs and bytes of the op (`attention_cost`).

Inputs are laid out as the model has them (`attention_inputs`): queries of batch 1 shared by every cell
(the baselines expand them, a view), keys and values as the two halves of a fused K/V projection, and for
pooling a ragged key mask. `smoke=True` runs the SMOKE shape in fp32 on the CPU, one call each: it checks
that every path runs (the Triton kernels need TRITON_INTERPRET=1 there), not speed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from scldm_scale.bench.timing import peak_memory_mib, time_ms

# cells, heads, latent tokens, genes, head dim of a smoke run: a few interpreter launches per op
SMOKE = {"cells": 2, "heads": 2, "n_latents": 4, "genes": 40, "head_dim": 16}
_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def attention_cost(
    bsz: int, n_heads: int, len_q: int, len_k: int, head_dim: int, q_batch: int, element_size: int, masked: bool
) -> dict[str, float]:
    """Minimal FLOPs and bytes of the forward and the backward pass (the work any implementation must do).

    FLOPs (a multiply-add counts 2): forward S = q kᵀ and O = P v: 4·B·H·Lq·Lk·D. Backward dV = Pᵀ dO,
    dP = dO vᵀ, dQ = dS k, dK = dSᵀ q: 8·B·H·Lq·Lk·D (recomputing S and the exponentials are not counted).
    Bytes, each tensor touched once with e bytes per element, n_q = Bq·Lq·H·D, n_kv = B·Lk·H·D,
    n_o = B·Lq·H·D, plus B·Lk mask bytes when masked:
    forward reads q, k, v and writes O: e·(n_q + 2·n_kv + n_o); backward reads q, k, v, O, dO and writes
    dq, dk, dv: e·(2·n_q + 4·n_kv + 2·n_o). A stored log-sum-exp is the kernel's choice, not counted.
    """
    n_q = q_batch * len_q * n_heads * head_dim
    n_kv = bsz * len_k * n_heads * head_dim
    n_o = bsz * len_q * n_heads * head_dim
    mask_bytes = bsz * len_k if masked else 0
    return {
        "forward_flops": 4.0 * bsz * n_heads * len_q * len_k * head_dim,
        "backward_flops": 8.0 * bsz * n_heads * len_q * len_k * head_dim,
        "forward_bytes": float(element_size * (n_q + 2 * n_kv + n_o) + mask_bytes),
        "backward_bytes": float(element_size * (2 * n_q + 4 * n_kv + 2 * n_o) + mask_bytes),
    }


def attention_inputs(
    kind: str,
    cells: int,
    heads: int,
    n_queries: int,
    n_keys: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Random (q, k, v, key_mask, output gradient) of one op on the model's layout.

    q (1, Lq, H, D) is shared by every cell; k, v (B, Lk, H, D) are views of one fused K/V projection output;
    pooling gets a key mask (B, Lk) with lengths uniform in [Lk/2, Lk] (cells express different genes),
    unpooling none (every latent token is a key). The gradient of the output is (B, Lq, H, D).
    """
    q = torch.randn(1, n_queries, heads * head_dim, device=device, dtype=dtype, generator=generator)
    q = q.unflatten(-1, (heads, head_dim))  # (1, Lq, H, D)
    kv = torch.randn(cells, n_keys, 2 * heads * head_dim, device=device, dtype=dtype, generator=generator)
    k, v = (t.unflatten(-1, (heads, head_dim)) for t in kv.chunk(2, dim=-1))  # (B, Lk, H, D) views
    key_mask = None
    if kind == "pooling":
        lengths = torch.randint(n_keys // 2, n_keys + 1, (cells, 1), device=device, generator=generator)
        key_mask = torch.arange(n_keys, device=device)[None] < lengths  # (B, Lk)
    grad_out = torch.randn(cells, n_queries, heads, head_dim, device=device, dtype=dtype, generator=generator)
    return q, k, v, key_mask, grad_out


def _sdpa_runner(backend_name: str, key_mask: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Lk)

    def run(q, k, v):
        with sdpa_kernel(backend):
            q = q.expand(k.shape[0], -1, -1, -1).transpose(1, 2)  # (B, H, Lq, D)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
            )  # (B, H, Lq, D)
        return out.transpose(1, 2)  # (B, Lq, H, D)

    return run


def _flex_runner(key_mask: torch.Tensor | None, shape: tuple[int, int, int]) -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    bsz, len_q, len_k = shape
    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if key_mask is not None:
        block_mask = create_block_mask(
            lambda b, h, q_idx, kv_idx: key_mask[b, kv_idx], bsz, None, len_q, len_k, device=key_mask.device
        )

    def run(q, k, v):
        q = q.expand(bsz, -1, -1, -1).transpose(1, 2)  # (B, H, Lq, D)
        return compiled(q, k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask).transpose(1, 2)

    return run


def bench_mcab_attention(
    kind: str = "pooling",
    *,
    cells: int = 256,
    heads: int = 8,
    n_queries: int | None = None,
    n_keys: int | None = None,
    head_dim: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    warmup: int = 5,
    reps: int = 20,
    smoke: bool = False,
    backends: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Time the fused kernel against every SDPA backend and compiled FlexAttention, forward and forward+backward.

    kind "pooling": n_queries (default 32) shared queries over n_keys (default 4096) keys per cell with a
    ragged key mask; "unpooling": n_queries (default 4096) shared gene queries over n_keys (default 32) keys,
    no mask. One row per (backend, pass): median ms (`time_ms`), TFLOP/s and GB/s over the minimal FLOPs and
    bytes of `attention_cost`, peak CUDA memory above the inputs (MiB), or the error that made a backend
    unavailable (flash takes no mask, cuDNN needs a GPU, ...). smoke=True: the SMOKE shape in fp32 on the
    CPU, one repetition. backends: a subset of "triton", "sdpa_flash_attention", "sdpa_efficient_attention",
    "sdpa_cudnn_attention", "sdpa_math", "flex_compiled" (default: all).
    """
    from scldm_kernels._triton import kernel_unavailable_reason
    from scldm_kernels.mcab_attention import pooling_attention, unpooling_attention

    if kind not in ("pooling", "unpooling"):
        raise ValueError(f"kind must be 'pooling' or 'unpooling'; got {kind!r}")
    pooling = kind == "pooling"
    if smoke:
        cells, heads, head_dim = SMOKE["cells"], SMOKE["heads"], SMOKE["head_dim"]
        dtype, device, warmup, reps = torch.float32, "cpu", 0, 1
        n_queries, n_keys = (SMOKE["n_latents"], SMOKE["genes"]) if pooling else (SMOKE["genes"], SMOKE["n_latents"])
    n_queries = n_queries if n_queries is not None else 32 if pooling else 4096
    n_keys = n_keys if n_keys is not None else 4096 if pooling else 32
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, key_mask, grad_out = attention_inputs(kind, cells, heads, n_queries, n_keys, head_dim, dtype, device, gen)
    cost = attention_cost(cells, heads, n_queries, n_keys, head_dim, 1, q.element_size(), pooling)

    runners: dict[str, Callable[..., torch.Tensor] | str] = {}
    reason = kernel_unavailable_reason(q)
    fused = pooling_attention if pooling else unpooling_attention
    runners["triton"] = reason or (lambda q, k, v: fused(q, k, v, key_mask))
    for name in _SDPA_BACKENDS:
        runners[f"sdpa_{name.lower()}"] = _sdpa_runner(name, key_mask)
    if backends is None or "flex_compiled" in backends:  # compiling costs seconds: only when asked for
        runners["flex_compiled"] = _flex_runner(key_mask, (cells, n_queries, n_keys))
    if backends is not None:
        unknown = set(backends) - set(runners) - {"flex_compiled"}
        if unknown:
            raise ValueError(f"unknown backends {sorted(unknown)}; expected a subset of {[*runners, 'flex_compiled']}")
        runners = {name: run for name, run in runners.items() if name in backends}

    shape = dict(kind=kind, cells=cells, heads=heads, n_queries=n_queries, n_keys=n_keys, head_dim=head_dim)
    rows = []
    for backend, run in runners.items():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        passes = {
            "forward": (lambda run=run: run(q, k, v), cost["forward_flops"], cost["forward_bytes"]),
            "forward+backward": (
                lambda run=run, leaves=leaves: torch.autograd.grad(run(*leaves), leaves, grad_out),
                cost["forward_flops"] + cost["backward_flops"],
                cost["forward_bytes"] + cost["backward_bytes"],
            ),
        }
        for name, (fn, flops, n_bytes) in passes.items():
            row: dict[str, Any] = {**shape, "dtype": str(dtype), "device": str(device), "backend": backend}
            row.update({"pass": name, "flops": flops, "bytes": n_bytes})
            if isinstance(run, str):
                rows.append({**row, "error": run})
                continue
            try:
                with torch.no_grad() if name == "forward" else torch.enable_grad():
                    ms = time_ms(fn, device, warmup=warmup, reps=reps)
                    peak = peak_memory_mib(fn, device)
            except Exception as error:  # an unavailable backend is a result, not a failure
                rows.append({**row, "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"})
                continue
            rows.append({**row, "ms": ms, "tflops": flops / ms / 1e9, "gbs": n_bytes / ms / 1e6, "peak_mib": peak})
    return rows
