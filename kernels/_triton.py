"""What every kernel module shares: the optional Triton import, the dispatch rule, the loud fallback, and
special functions written in plain `tl`.

- `triton` and `tl` are None when Triton is not installed; kernel modules define their kernels under
  `if HAS_TRITON:` and still import (their PyTorch references work everywhere).
- `INTERPRETING` is read once, here, when this module is first imported: Triton decides between its
  compiler and its CPU interpreter when each `@triton.jit` runs (its own standard library's too, at
  `import triton`), so TRITON_INTERPRET=1 must be set before Triton is imported, and this constant stays
  true to how the kernels were built.
- lgamma and digamma are a shift by 6 with the recurrence, then the Stirling series: libdevice has lgamma
  but not digamma, and the interpreter has neither, so one implementation serves CPU and GPU alike.
"""

from __future__ import annotations

import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels' PyTorch references still work
    triton = None
    tl = None

HAS_TRITON = triton is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

logger = logging.getLogger("scldm_kernels")
_warned: set[str] = set()


def kernel_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """None when the Triton kernels can run on these tensors, else why not (for the fallback warning)."""
    if not HAS_TRITON:
        return "Triton is not installed (pip install 'scldm-scale[kernels]')"
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return None if not INTERPRETING else "TRITON_INTERPRET=1 is set but the tensors are on CUDA"
    if devices == {"cpu"}:
        return None if INTERPRETING else "the tensors are on the CPU and TRITON_INTERPRET=1 was not set"
    return f"the tensors are on {', '.join(sorted(devices))}, which Triton does not support"


def warn_fallback_once(op: str, reason: str) -> None:
    """One warning per op and reason per process, naming the slow path that runs instead."""
    key = f"{op}: {reason}"
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s falls back to its PyTorch reference (slow, full-size temporaries): %s", op, reason)


def autotune_configs(configs: list, interpreter_config=None) -> list:
    """All configs on a GPU; one under the interpreter, whose autotuner cannot try several: interpreter_config
    (e.g. a small block, so that tests with a few hundred genes still loop over several blocks) or the first."""
    if INTERPRETING:
        return [interpreter_config if interpreter_config is not None else configs[0]]
    return configs


if HAS_TRITON:
    # Shift: lgamma(z) = lgamma(z + 6) - log(z (z+1) ... (z+5)) and psi(z) = psi(z + 6) - sum_k 1/(z + k),
    # applied only below 6 (the product would overflow fp32 for huge z). From z >= 6 the series' first
    # omitted terms are below 2e-9 (lgamma) and 1e-8 (digamma).
    _SHIFT = tl.constexpr(6.0)
    _HALF_LOG_2PI = tl.constexpr(0.9189385332046727)  # log(2 pi) / 2

    @triton.jit
    def log1p(v):
        """log(1 + v), exact to rounding for tiny v as well (Goldberg's trick: no libdevice needed)."""
        u = 1.0 + v
        exact = u == 1.0
        return tl.where(exact, v, tl.log(u) * (v / tl.where(exact, 1.0, u - 1.0)))

    @triton.jit
    def softplus(v):
        """log(1 + exp(v)) without overflow, accurate where it is tiny."""
        return tl.maximum(v, 0.0) + log1p(tl.exp(-tl.abs(v)))

    @triton.jit
    def _stirling_correction(z):
        """lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2] for z >= 6."""
        r = 1.0 / z
        r2 = r * r
        return r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0 - r2 * (1.0 / 1680.0))))

    @triton.jit
    def lgamma(z):
        """log Gamma(z) for z > 0; absolute error ~1e-6 in fp32 for z below ~100 (relative beyond)."""
        small = z < _SHIFT
        zs = tl.minimum(z, _SHIFT)  # the product is used below 6 only; capped, it cannot overflow
        prod = zs * (zs + 1.0) * (zs + 2.0) * (zs + 3.0) * (zs + 4.0) * (zs + 5.0)
        w = tl.where(small, z + _SHIFT, z)
        stirling = (w - 0.5) * tl.log(w) - w + _HALF_LOG_2PI + _stirling_correction(w)
        return tl.where(small, stirling - tl.log(prod), stirling)

    @triton.jit
    def lgamma_diff(b, d):
        """lgamma(b + d) - lgamma(b) for b > 0, b + d > 0, |d| <= b, without the cancellation of two large
        lgammas: from 6 on, (b + d - 1/2) log1p(d / b) + d (log b - 1) + the two Stirling corrections."""
        c = b + d
        stirling = (c - 0.5) * log1p(d / b) + d * (tl.log(b) - 1.0)
        # The maxima only keep the unselected lanes (below 6) finite.
        stirling += _stirling_correction(tl.maximum(c, _SHIFT)) - _stirling_correction(tl.maximum(b, _SHIFT))
        direct = lgamma(c) - lgamma(b)
        return tl.where((b >= _SHIFT) & (c >= _SHIFT), stirling, direct)

    @triton.jit
    def _digamma_tail(w):
        """digamma(w) - log(w) for w >= 6."""
        r = 1.0 / w
        r2 = r * r
        return -0.5 * r - r2 * (1.0 / 12.0 - r2 * (1.0 / 120.0 - r2 * (1.0 / 252.0 - r2 * (1.0 / 240.0))))

    @triton.jit
    def digamma(z):
        """psi(z) = d/dz log Gamma(z) for z > 0."""
        small = z < _SHIFT
        recip = 1.0 / z + 1.0 / (z + 1.0) + 1.0 / (z + 2.0) + 1.0 / (z + 3.0) + 1.0 / (z + 4.0) + 1.0 / (z + 5.0)
        w = tl.where(small, z + _SHIFT, z)
        value = tl.log(w) + _digamma_tail(w)
        return tl.where(small, value - recip, value)

    @triton.jit
    def digamma_diff(b, d):
        """psi(b + d) - psi(b) for b > 0, d >= 0: from b >= 6 on, log1p(d / b) plus the difference of the
        small series tails, instead of two nearly equal logs."""
        # The maxima only keep the unselected lanes (b < 6) finite.
        stable = log1p(d / b) + _digamma_tail(tl.maximum(b + d, _SHIFT)) - _digamma_tail(tl.maximum(b, _SHIFT))
        return tl.where(b >= _SHIFT, stable, digamma(b + d) - digamma(b))
