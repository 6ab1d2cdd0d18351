"""Linear interpolant for flow matching on the latent tokens (SiT convention).

Path:   x_t = t·x1 + (1 − t)·x0,   x0 ~ N(0, I) (noise, t = 0),   x1 = data latent (t = 1).
Target: u = d x_t / dt = x1 − x0, regressed with a mean-squared error; samples are drawn by integrating
the learned velocity from t = 0 (noise) to t = 1 (data), see `sampling.integrate`.

What is unusual here:
- The time direction follows SiT, not the issue's "x_t = (1 − t)·x0 + t·ε": that is the same path with
  t ↦ 1 − t (there t = 0 is data and t = 1 is noise). Samplers and the timestep embedding use SiT's t.
- t ~ U[0, 1) with no epsilon floor: the linear path's target x1 − x0 is finite at both ends, so
  unlike score or noise parametrisations nothing needs clipping (SiT also uses train_eps = 0 for it).
- Noise and time are drawn only when the caller passes none; a passed `x0` or `t` is always used as
  given (the reference silently overrode its epsilons).
- `loss` returns the per-sample error (B,), so the trainer decides on weighting and reduction.
"""

from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times (B,) to broadcast over the trailing dims of x (B, ...)."""
    if t.shape != x.shape[:1]:
        raise ValueError(f"t must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)


class LinearInterpolant:
    """x_t = t·x1 + (1 − t)·x0 with velocity target x1 − x0; t = 0 is noise, t = 1 is data."""

    def sample_time(
        self,
        n: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Training times t ~ U[0, 1), shape (n,)."""
        return torch.rand(n, device=device, dtype=dtype, generator=generator)

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Point on the path at per-sample times t (B,); x0 and x1 are (B, ...)."""
        t = _expand_time(t, x1)  # (B, 1, ..., 1)
        return t * x1 + (1 - t) * x0

    def velocity_target(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """d x_t / dt, the same at every t on the linear path."""
        return x1 - x0

    def loss(
        self,
        velocity_fn: VelocityFn,
        x1: torch.Tensor,
        generator: torch.Generator | None = None,
        x0: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample flow-matching error mean((v(x_t, t) − (x1 − x0))²) over trailing dims, shape (B,).

        `x0` (like x1) and `t` (B,) are drawn from `generator` only when not given.
        """
        if x0 is None:
            x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        if t is None:
            t = self.sample_time(x1.shape[0], x1.device, generator=generator, dtype=x1.dtype)
        x_t = self.interpolate(x0, x1, t)  # (B, ...)
        error = velocity_fn(x_t, t) - self.velocity_target(x0, x1)  # (B, ...)
        return error.square().flatten(1).mean(dim=1)  # (B,)
