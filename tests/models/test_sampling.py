"""Samplers against closed-form ODE solutions and a Gaussian-mixture flow; guidance against separate calls."""

import itertools
import math

import pytest
import torch
import torch.nn as nn

from scldm_scale.models.sampling import guided_velocity, integrate, make_guided_velocity_fn
from scldm_scale.models.transport import LinearInterpolant

# ---------------------------------------------------------------------------------------------------
# Linear ODE dx/dt = A x: x(1) = expm(A) x(0).

A = torch.tensor([[-0.5, 1.0, 0.0], [-1.0, -0.5, 0.3], [0.2, 0.0, -1.0]], dtype=torch.float64)


def _linear_problem() -> tuple[torch.Tensor, torch.Tensor]:
    x_init = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x_init, x_init @ torch.linalg.matrix_exp(A).T


def _linear_error(method: str, n_steps: int) -> float:
    x_init, exact = _linear_problem()
    x = integrate(lambda x, t: x @ A.T, x_init, method=method, n_steps=n_steps)
    return (x - exact).norm().item()


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("heun", 2)])
def test_fixed_step_convergence_order(method, order):
    errors = [_linear_error(method, n) for n in (20, 40, 80)]
    for coarse, fine in itertools.pairwise(errors):
        observed_order = math.log2(coarse / fine)
        assert abs(observed_order - order) < 0.15, (method, errors)


def test_dopri5_matches_matrix_exponential():
    x_init, exact = _linear_problem()
    x = integrate(lambda x, t: x @ A.T, x_init, method="dopri5", atol=1e-6, rtol=1e-6)
    assert ((x - exact).norm() / exact.norm()).item() < 1e-4


def test_time_argument_and_interval():
    # dx/dt = 2t: the trapezoid rule (heun) is exact; Euler sums the left endpoints.
    x_init = torch.zeros(5, 2, dtype=torch.float64)
    seen_shapes = set()

    def field(x, t):
        seen_shapes.add(tuple(t.shape))
        return 2 * t[:, None].expand_as(x)

    n = 4
    euler = integrate(field, x_init, method="euler", n_steps=n)
    torch.testing.assert_close(euler, torch.full_like(x_init, (n - 1) / n))
    heun = integrate(field, x_init, method="heun", n_steps=3, t0=0.5, t1=1.0)
    torch.testing.assert_close(heun, torch.full_like(x_init, 0.75))
    dopri5 = integrate(field, x_init, method="dopri5", t0=0.25, t1=0.75)
    torch.testing.assert_close(dopri5, torch.full_like(x_init, 0.5))
    assert seen_shapes == {(5,)}


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="euler, heun, dopri5"):
        integrate(lambda x, t: x, torch.zeros(2, 2), method="rk4")


# ---------------------------------------------------------------------------------------------------
# Gaussian mixture data x1 ~ Σ_i π_i N(μ_i, s_i² I). Given component i, (x1, x_t) is jointly Gaussian
# with x_t ~ N(t μ_i, σ_i² I), σ_i² = t² s_i² + (1 − t)², Cov(x1, x_t) = t s_i², Cov(x0, x_t) = 1 − t, so
#   E[x1 − x0 | x_t, i] = μ_i + (t s_i² − (1 − t)) / σ_i² · (x_t − t μ_i),
# and the marginal velocity is Σ_i r_i(x_t) E[x1 − x0 | x_t, i] with r_i ∝ π_i N(x_t; t μ_i, σ_i² I).

MEANS = torch.tensor([[-2.0, -1.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)  # (K, D)
STDS = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)  # (K,)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # (K,)


def _mixture_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t[:, None]  # (B, 1)
    var = t**2 * STDS**2 + (1 - t) ** 2  # (B, K)
    centred = x[:, None, :] - t[:, :, None] * MEANS  # (B, K, D)
    log_resp = WEIGHTS.log() - centred.square().sum(-1) / (2 * var) - MEANS.shape[1] / 2 * var.log()  # (B, K)
    resp = log_resp.softmax(dim=-1)  # (B, K)
    gain = (t * STDS**2 - (1 - t)) / var  # (B, K)
    component_velocity = MEANS + gain[:, :, None] * centred  # (B, K, D)
    return (resp[:, :, None] * component_velocity).sum(dim=1)  # (B, D)


def _mixture_statistics(samples: torch.Tensor, means: torch.Tensor):
    """Weight, mean and per-dimension std of the samples nearest to each mixture mean."""
    nearest = torch.cdist(samples, means).argmin(dim=1)
    stats = []
    for i in range(len(means)):
        members = samples[nearest == i]
        stats.append((len(members) / len(samples), members.mean(0), members.std(0)))
    return stats


@pytest.mark.parametrize(("method", "n_steps"), [("heun", 100), ("dopri5", 0)])
def test_exact_mixture_field_transports_noise_to_mixture(method, n_steps):
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    samples = integrate(_mixture_velocity, noise, method=method, n_steps=n_steps)
    for i, (weight, mean, std) in enumerate(_mixture_statistics(samples, MEANS)):
        assert abs(weight - WEIGHTS[i].item()) < 0.05
        assert (mean - MEANS[i]).abs().max() < 0.1
        assert ((std / STDS[i] - 1).abs() < 0.1).all(), (i, std)


@pytest.mark.parametrize("sde_noise", [0.5, 2.0])
def test_sde_with_the_exact_field_draws_the_mixture(sde_noise):
    # The score is -(x - t v)/(1 - t) for this interpolant: a wrong sign or scale in the drift's correction
    # changes the spread by far more than the tolerance (e = 2 with the sign flipped diverges).
    torch.manual_seed(0)
    noise = torch.randn(4000, 2, dtype=torch.float64)
    samples = integrate(_mixture_velocity, noise, method="sde", n_steps=400, sde_noise=sde_noise)
    for i, (weight, mean, std) in enumerate(_mixture_statistics(samples, MEANS)):
        assert abs(weight - WEIGHTS[i].item()) < 0.05
        assert (mean - MEANS[i]).abs().max() < 0.1
        assert ((std / STDS[i] - 1).abs() < 0.1).all(), (i, std)


def test_sde_is_seeded_stochastic_and_euler_without_noise():
    x_init = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    euler = integrate(_mixture_velocity, x_init, method="euler", n_steps=20)
    torch.testing.assert_close(
        integrate(_mixture_velocity, x_init, method="sde", n_steps=20, sde_noise=0.0), euler, rtol=0, atol=0
    )
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(integrate(_mixture_velocity, x_init, method="sde", n_steps=20, sde_noise=1.0))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    assert (draws[0] - euler).abs().mean() > 0.05  # the noise was added


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_sde_noise_must_be_finite_and_not_negative(bad):
    with pytest.raises(ValueError, match="sde_noise must be a finite number >= 0"):
        integrate(_mixture_velocity, torch.zeros(2, 2), method="sde", n_steps=4, sde_noise=bad)


class _TimeMLP(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))  # (B, 2)


def test_trained_mlp_field_recovers_two_component_mixture():
    torch.manual_seed(0)
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    weights = torch.tensor([0.7, 0.3])
    g = torch.Generator().manual_seed(2)
    model = _TimeMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    path = LinearInterpolant()
    for _ in range(300):
        component = torch.multinomial(weights, 256, replacement=True, generator=g)
        x1 = means[component] + 0.3 * torch.randn(256, 2, generator=g)
        loss = path.loss(model, x1, generator=g).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        samples = integrate(model, torch.randn(2000, 2, generator=g), method="heun", n_steps=50)
    for i, (weight, mean, _) in enumerate(_mixture_statistics(samples, means)):
        assert abs(weight - weights[i].item()) < 0.15, (i, weight)
        assert (mean - means[i]).norm() < 0.5, (i, mean)


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance.

NULL_IDS = {"cell_type": 4, "tissue": 3, "donor": 5}


class _ToyConditionalModel(nn.Module):
    """Nonlinear in the conditions, so v_all differs from any combination of single-key predictions."""

    def __init__(self, width: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.embeddings = nn.ParameterDict(
            {key: nn.Parameter(torch.randn(n + 1, width, generator=g)) for key, n in NULL_IDS.items()}
        )
        self.mix = nn.Parameter(torch.randn(width, width, generator=g))
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append(conditions)
        c = sum(self.embeddings[key][conditions[key]] for key in NULL_IDS)  # (B, W)
        return torch.tanh(x @ self.mix + c[:, None, :]) * (1 + t[:, None, None])  # (B, M, W)


def _toy_inputs():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 3, 4, generator=g)  # (B, M, L)
    t = torch.rand(5, generator=g)
    requested = {"cell_type": torch.tensor([0, 1, 2, 3, 0]), "tissue": torch.tensor([2, 1, 0, 2, 1])}
    return x, t, requested


def _labels(requested: dict, active: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {
        key: requested[key] if key in active else torch.full((5,), null, dtype=torch.long)
        for key, null in NULL_IDS.items()
    }


def test_all_zero_weights_give_null_prediction_with_one_branch():
    model = _ToyConditionalModel()
    x, t, requested = _toy_inputs()
    v = guided_velocity(model, x, t, requested, {"cell_type": 0.0, "tissue": 0.0}, NULL_IDS)
    assert len(model.calls) == 1 and model.calls[0]["donor"].shape == (5,)
    assert torch.equal(v, model(x, t, _labels(requested, ())))


def test_single_unit_weight_gives_that_condition_alone():
    model = _ToyConditionalModel()
    x, t, requested = _toy_inputs()
    v = guided_velocity(model, x, t, requested, {"cell_type": 0.0, "tissue": 1.0}, NULL_IDS)
    torch.testing.assert_close(v, model(x, t, _labels(requested, ("tissue",))), atol=1e-6, rtol=0)


def test_joint_unit_weight_gives_all_conditions_prediction():
    model = _ToyConditionalModel()
    x, t, requested = _toy_inputs()
    v = guided_velocity(model, x, t, requested, 1.0, NULL_IDS, mode="joint")
    expected = model(x, t, _labels(requested, ("cell_type", "tissue")))
    torch.testing.assert_close(v, expected, atol=1e-6, rtol=0)


def test_batched_branches_match_separate_calls():
    model = _ToyConditionalModel()
    x, t, requested = _toy_inputs()
    requested["donor"] = 2  # an int applies to the whole batch
    weights = {"cell_type": 2.0, "tissue": -0.5, "donor": 1.5}
    v = guided_velocity(model, x, t, requested, weights, NULL_IDS)
    assert len(model.calls) == 1 and model.calls[0]["cell_type"].shape == (4 * 5,)

    full = dict(requested, donor=torch.full((5,), 2))
    v_null = model(x, t, _labels(full, ()))
    expected = v_null + sum(w * (model(x, t, _labels(full, (key,))) - v_null) for key, w in weights.items())
    torch.testing.assert_close(v, expected, atol=1e-5, rtol=1e-5)

    v_joint = guided_velocity(model, x, t, requested, 3.0, NULL_IDS, mode="joint")
    v_all = model(x, t, _labels(full, tuple(NULL_IDS)))
    torch.testing.assert_close(v_joint, v_null + 3.0 * (v_all - v_null), atol=1e-5, rtol=1e-5)


def test_absent_keys_are_null_and_guided_closure_integrates():
    model = _ToyConditionalModel()
    x, t, requested = _toy_inputs()
    only_type = {"cell_type": requested["cell_type"]}
    velocity_fn = make_guided_velocity_fn(model, only_type, {"cell_type": 2.0}, NULL_IDS)
    v = velocity_fn(x, t)
    (labels,) = model.calls
    assert torch.equal(labels["tissue"], torch.full((10,), 3)) and torch.equal(labels["donor"], torch.full((10,), 5))
    torch.testing.assert_close(v, guided_velocity(model, x, t, only_type, {"cell_type": 2.0}, NULL_IDS))
    with torch.no_grad():
        out = integrate(velocity_fn, x, method="heun", n_steps=3)
    assert out.shape == x.shape and len(model.calls) == 2 + 2 * 3


@pytest.mark.parametrize(
    ("conditions", "weights", "mode", "match"),
    [
        ({"cell_type": 1}, {"batch": 1.0}, "compositional", "'batch'"),
        ({"batch": 1}, {"batch": 1.0}, "compositional", "'batch'"),
        ({"cell_type": 1}, {}, "compositional", "'cell_type' has no guidance weight"),
        ({}, {"tissue": 2.0}, "compositional", "'tissue' has guidance weight"),
        ({"cell_type": 1}, 2.0, "compositional", "mapping"),
        ({"cell_type": 1}, {"cell_type": 2.0}, "joint", "single float"),
        ({"cell_type": 1}, 2.0, "sum", "compositional, joint"),
    ],
)
def test_invalid_guidance_requests_name_the_problem(conditions, weights, mode, match):
    x, t, _ = _toy_inputs()
    with pytest.raises(ValueError, match=match):
        guided_velocity(_ToyConditionalModel(), x, t, conditions, weights, NULL_IDS, mode=mode)
    with pytest.raises(ValueError, match=match):
        make_guided_velocity_fn(_ToyConditionalModel(), conditions, weights, NULL_IDS, mode=mode)
