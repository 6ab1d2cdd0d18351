"""LinearInterpolant: endpoints, target = d x_t/dt, and the loss against closed forms."""

import torch

from scldm_scale.models.transport import LinearInterpolant


def _pair(seed: int, shape=(6, 3, 4), dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def test_endpoints_are_noise_at_zero_and_data_at_one():
    x0, x1 = _pair(0, dtype=torch.float32)
    path = LinearInterpolant()
    assert torch.equal(path.interpolate(x0, x1, torch.zeros(6)), x0)
    assert torch.equal(path.interpolate(x0, x1, torch.ones(6)), x1)


def test_interpolate_broadcasts_per_sample_time():
    x0, x1 = _pair(1)
    t = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    x_t = LinearInterpolant().interpolate(x0, x1, t)
    for i in range(6):
        torch.testing.assert_close(x_t[i], t[i] * x1[i] + (1 - t[i]) * x0[i])


def test_velocity_target_is_time_derivative_of_path():
    x0, x1 = _pair(2)
    path = LinearInterpolant()
    t = torch.tensor([0.0, 0.2, 0.35, 0.5, 0.8, 0.99], dtype=torch.float64)
    h = 1e-5
    finite_difference = (path.interpolate(x0, x1, t + h) - path.interpolate(x0, x1, t - h)) / (2 * h)
    torch.testing.assert_close(finite_difference, path.velocity_target(x0, x1), atol=1e-8, rtol=0)


def test_sample_time_is_uniform_unit_interval_and_seeded():
    path = LinearInterpolant()
    t = path.sample_time(20_000, "cpu", generator=torch.Generator().manual_seed(3))
    assert t.shape == (20_000,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 1 / 12) < 0.003
    again = path.sample_time(20_000, "cpu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, again)


def test_loss_of_zero_field_is_mean_squared_target():
    x0, x1 = _pair(4)
    t = torch.full((6,), 0.3, dtype=torch.float64)
    loss = LinearInterpolant().loss(lambda x, t: torch.zeros_like(x), x1, x0=x0, t=t)
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, ((x1 - x0) ** 2).mean(dim=(1, 2)))


def test_loss_uses_given_noise_and_time():
    x0, x1 = _pair(5)
    t = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
    seen = {}

    def field(x_t, t_in):
        seen["x_t"], seen["t"] = x_t, t_in
        return torch.zeros_like(x_t)

    LinearInterpolant().loss(field, x1, generator=torch.Generator().manual_seed(9), x0=x0, t=t)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], t[:, None, None] * x1 + (1 - t[:, None, None]) * x0)


def test_loss_vanishes_for_exact_field_of_point_mass():
    # Data is the single point mu, so x0 = (x_t − t·mu) / (1 − t) and E[x1 − x0 | x_t] = (mu − x_t) / (1 − t).
    mu = torch.tensor([[1.5, -2.0], [0.5, 3.0]], dtype=torch.float64)  # (M, L)
    x1 = mu.expand(64, 2, 2)

    def exact(x_t, t):
        return (mu - x_t) / (1 - t[:, None, None])

    path = LinearInterpolant()
    loss = path.loss(exact, x1, generator=torch.Generator().manual_seed(6))
    assert loss.shape == (64,)
    assert loss.max() < 1e-16
    wrong = path.loss(lambda x, t: exact(x, t) + 0.1, x1, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(wrong, torch.full((64,), 0.01, dtype=torch.float64))
