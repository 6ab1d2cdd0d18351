"""ODE and SDE samplers for the linear interpolant and classifier-free guidance over several conditions.

What is unusual here:
- Time runs from t0 = 0 (noise) to t1 = 1 (data), SiT's convention (see `transport.py`).
- Euler and Heun are fixed-step and honour `n_steps` (the reference ignored its configured steps);
  Heun always applies its corrector, also on the last step, so it costs 2·n_steps evaluations.
  dopri5 is adaptive (torchdiffeq) and ignores `n_steps`. sde is Euler-Maruyama on the SDE that keeps the
  interpolant's marginals (SiT's, with diffusion g(t)^2 = 2e(1 - t)): for x_t = t x1 + (1 - t) x0, x0 ~ N(0, I),
  the score is -(x - t v)/(1 - t), so the drift v + g^2/2 * score = v - e (x - t v) stays bounded up to t = 1;
  its last step adds no noise. e = 0 is the Euler ODE, step for step. The defaults (Heun, 50 steps, atol = rtol = 1e-5,
  the published dopri5 tolerances) are `config.SampleConfig`'s, as they are for the CLI and the YAML.
- Guidance evaluates every branch it needs (NULL, one per condition, or all conditions) in ONE model
  call on a batch concatenated along dim 0, because the model is a transformer. It is written as
  v = (1 − Σ_k w_k)·v_∅ + Σ_k w_k·v_k, which equals v_∅ + Σ_k w_k (v_k − v_∅) and lets a branch with
  coefficient 0 be skipped: weight-0 conditions cost nothing, and with Σ_k w_k = 1 neither does v_∅.
- Nothing here switches off autograd; wrap sampling in torch.no_grad() at the call site.
"""

import math
from collections.abc import Callable, Mapping

import torch
from torchdiffeq import odeint

from scldm_scale.config import SAMPLERS, ConfigError, SampleConfig, check_sde_noise

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Conditions = Mapping[str, torch.Tensor | int]
# model(x (B, ...), t (B,), {key: LongTensor (B,)}) -> velocity (B, ...)
GuidedModel = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]

GUIDANCE_MODES = ("compositional", "joint")


def integrate(
    velocity_fn: VelocityFn,
    x_init: torch.Tensor,
    method: str = SampleConfig.method,
    n_steps: int = SampleConfig.n_steps,
    atol: float = SampleConfig.atol,
    rtol: float = SampleConfig.rtol,
    t0: float = 0.0,
    t1: float = 1.0,
    sde_noise: float = SampleConfig.sde_noise,
) -> torch.Tensor:
    """Solve dx/dt = velocity_fn(x, t) from x(t0) = x_init (B, ...) and return x(t1); method "sde" draws
    x(t1) from the SDE with the same marginals instead (noise from torch's global generator).

    `velocity_fn` receives t as a (B,) tensor. `n_steps` is used by euler, heun and sde, `atol`/`rtol` by
    dopri5 only, `sde_noise` by sde only.
    """
    if method not in SAMPLERS:
        raise ConfigError(f"unknown ODE method {method!r}; valid methods are {', '.join(SAMPLERS)}")
    noise_level = check_sde_noise(sde_noise, "sde_noise")
    batch = x_init.shape[0]

    def times(t: float | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, device=x_init.device, dtype=x_init.dtype).expand(batch)  # (B,)

    if method == "dopri5":
        t_span = torch.tensor([t0, t1], device=x_init.device, dtype=x_init.dtype)
        path = odeint(
            lambda t, x: velocity_fn(x, times(t)), x_init, t_span, method="dopri5", atol=atol, rtol=rtol
        )  # (2, B, ...)
        return path[-1]

    if n_steps < 1:
        raise ConfigError(f"n_steps must be >= 1 for the fixed-step {method} sampler, got {n_steps}")
    dt = (t1 - t0) / n_steps
    x = x_init
    for i in range(n_steps):
        t_now, t_next = t0 + i * dt, t0 + (i + 1) * dt
        v_now = velocity_fn(x, times(t_now))
        if method == "euler":
            x = x + dt * v_now
        elif method == "sde":
            x = x + dt * (v_now - noise_level * (x - t_now * v_now))
            if i < n_steps - 1:
                x = x + math.sqrt(2.0 * noise_level * (1.0 - t_now) * dt) * torch.randn_like(x)
        else:  # heun: Euler predictor, trapezoidal corrector
            v_next = velocity_fn(x + dt * v_now, times(t_next))
            x = x + 0.5 * dt * (v_now + v_next)
    return x


def _guidance_branches(
    conditions: Conditions,
    weights: Mapping[str, float] | float,
    null_ids: Mapping[str, int],
    mode: str,
) -> list[tuple[float, tuple[str, ...]]]:
    """Validate a guidance request; return (coefficient, active condition keys) for each branch.

    A branch is one model evaluation with the listed keys set to their requested values and every
    other key of `null_ids` set to NULL. Branches with coefficient 0 are left out.
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"unknown guidance mode {mode!r}; valid modes are {', '.join(GUIDANCE_MODES)}")
    for key in conditions:
        if key not in null_ids:
            raise ValueError(f"condition {key!r} has no NULL id; known condition keys are {sorted(null_ids)}")

    if mode == "joint":
        if isinstance(weights, Mapping):
            raise ValueError("joint guidance takes a single float weight, not a mapping of per-key weights")
        w = float(weights)
        branches = [(1.0 - w, ()), (w, tuple(conditions))]
    else:
        if not isinstance(weights, Mapping):
            raise ValueError(
                "compositional guidance takes a mapping {condition key: weight}; use mode='joint' for a single weight"
            )
        for key, w in weights.items():
            if key not in null_ids:
                raise ValueError(
                    f"guidance weight given for unknown condition {key!r}; known condition keys are {sorted(null_ids)}"
                )
            if w != 0 and key not in conditions:
                raise ValueError(f"condition {key!r} has guidance weight {w} but no requested value")
        for key in conditions:
            if key not in weights:
                raise ValueError(f"condition {key!r} has no guidance weight; pass weights[{key!r}] (0 ignores it)")
        branches = [(1.0 - sum(weights.values()), ())]
        branches += [(float(w), (key,)) for key, w in weights.items()]
    return [(coef, keys) for coef, keys in branches if coef != 0]


def _evaluate_branches(
    model: GuidedModel,
    x: torch.Tensor,
    t: torch.Tensor,
    conditions: Conditions,
    null_ids: Mapping[str, int],
    branches: list[tuple[float, tuple[str, ...]]],
) -> torch.Tensor:
    """Σ coefficient · model(x, t, branch conditions), all branches in one batched model call."""
    batch, n_branches = x.shape[0], len(branches)
    labels = {}
    for key, null_id in null_ids.items():
        null = torch.full((batch,), null_id, device=x.device, dtype=torch.long)  # (B,)
        value = torch.as_tensor(conditions.get(key, null_id), device=x.device, dtype=torch.long)
        value = value.expand(batch)  # (B,)
        labels[key] = torch.cat([value if key in keys else null for _, keys in branches])  # (n·B,)
    x_all = torch.cat([x] * n_branches)  # (n·B, ...)
    t_all = torch.cat([t] * n_branches)  # (n·B,)
    v_all = model(x_all, t_all, labels).reshape(n_branches, *x.shape)  # (n, B, ...)
    coefficients = torch.tensor([coef for coef, _ in branches], device=x.device, dtype=v_all.dtype)
    coefficients = coefficients.reshape(n_branches, *([1] * x.ndim))  # (n, 1, ..., 1)
    return (coefficients * v_all).sum(dim=0)  # (B, ...)


def guided_velocity(
    model: GuidedModel,
    x: torch.Tensor,
    t: torch.Tensor,
    conditions: Conditions,
    weights: Mapping[str, float] | float,
    null_ids: Mapping[str, int],
    mode: str = "compositional",
) -> torch.Tensor:
    """Classifier-free-guided velocity at x (B, ...) and times t (B,).

    `model(x, t, conditions)` takes a dict with a LongTensor (B,) for every key of `null_ids`, where
    `null_ids[k]` is the dropped (NULL) class of key k. `conditions` holds the requested values (a
    LongTensor (B,) or an int for the whole batch); keys of `null_ids` absent from it stay NULL.

    compositional: v = v_∅ + Σ_k w_k (v_k − v_∅), `weights` = {key: w_k}; v_k sets only key k.
                   Every key of `conditions` needs a weight (0 ignores it).
    joint:         v = v_∅ + w (v_all − v_∅), `weights` = w (a float); v_all sets every key of
                   `conditions` at once.
    """
    branches = _guidance_branches(conditions, weights, null_ids, mode)
    return _evaluate_branches(model, x, t, conditions, null_ids, branches)


def make_guided_velocity_fn(
    model: GuidedModel,
    conditions: Conditions,
    weights: Mapping[str, float] | float,
    null_ids: Mapping[str, int],
    mode: str = "compositional",
) -> VelocityFn:
    """`guided_velocity` as a closure (x, t) -> v for `integrate`; the request is validated once, here."""
    branches = _guidance_branches(conditions, weights, null_ids, mode)

    def velocity_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _evaluate_branches(model, x, t, conditions, null_ids, branches)

    return velocity_fn
