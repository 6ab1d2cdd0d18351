"""Learning-rate schedules at their key steps, parameter groups, and the EMA against a hand computation."""

import math

import pytest
import torch
from torch import nn

from scldm_scale.config import OptimConfig, VAEConfig
from scldm_scale.models.vae import SetVAE
from scldm_scale.train.optim import EMA, build_optimizer, build_scheduler, lr_multiplier


def test_wsd_schedule_key_steps():
    cfg = OptimConfig(schedule="wsd", max_steps=1000, warmup_frac=0.1, decay_frac=0.2, min_lr_ratio=0.1)
    f = lr_multiplier(cfg)
    assert f(0) == pytest.approx(1 / 100)
    assert f(49) == pytest.approx(50 / 100)
    assert f(99) == pytest.approx(1.0)  # warmup ends
    assert f(100) == f(500) == f(799) == 1.0  # stable
    assert f(800) == pytest.approx(1.0)  # decay starts
    assert f(850) == pytest.approx(1 - 0.9 * math.sqrt(0.25))  # a quarter into the decay
    assert f(900) == pytest.approx(1 - 0.9 * math.sqrt(0.5))
    assert f(1000) == pytest.approx(0.1)  # final = min_lr_ratio
    assert f(5000) == pytest.approx(0.1)
    values = [f(s) for s in range(800, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_without_decay_stays_constant():
    f = lr_multiplier(OptimConfig(schedule="wsd", max_steps=100, warmup_frac=0.1, decay_frac=0.0))
    assert f(9) == 1.0 and f(99) == 1.0 and f(100) == 1.0


def test_cosine_schedule_key_steps():
    cfg = OptimConfig(schedule="cosine", max_steps=1000, warmup_frac=0.1, min_lr_ratio=0.1)
    f = lr_multiplier(cfg)
    assert f(0) == pytest.approx(1 / 100)
    assert f(99) == pytest.approx(1.0)  # warmup ends
    assert f(100) == pytest.approx(1.0)  # cosine starts at 1
    assert f(550) == pytest.approx(0.55)  # halfway: (1 + min) / 2
    assert f(325) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(1000) == pytest.approx(0.1)  # final = min_lr_ratio
    assert f(2000) == pytest.approx(0.1)


def test_warmup_of_at_least_one_step():
    f = lr_multiplier(OptimConfig(schedule="cosine", max_steps=5, warmup_frac=0.1))
    assert f(0) == 1.0


def test_scheduler_drives_the_optimizer_learning_rate():
    cfg = OptimConfig(lr=2e-3, schedule="wsd", max_steps=20, warmup_frac=0.25, decay_frac=0.5, min_lr_ratio=0.1)
    model = nn.Linear(3, 3)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    f = lr_multiplier(cfg)
    assert seen == pytest.approx([2e-3 * f(s) for s in range(20)])
    assert seen[0] == pytest.approx(2e-3 / 5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert all(group["lr"] == optimizer.param_groups[0]["lr"] for group in optimizer.param_groups)


def test_weight_decay_only_on_matrices():
    vae = SetVAE(VAEConfig(d_model=8, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=2, latent_dim=4), 10)
    cfg = OptimConfig(weight_decay=0.05, betas=[0.8, 0.9])
    optimizer = build_optimizer(vae, cfg)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.8, 0.9)
    names = {id(p): n for n, p in vae.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed | undecayed == set(names.values())
    assert "gene_embedding.weight" in undecayed
    assert "inducing_points" in undecayed
    assert "head.log_theta" in undecayed
    assert "pool.norm_q.weight" in undecayed
    assert "pool.attn.w_q.weight" in decayed
    assert "to_latent.weight" in decayed
    assert all(p.ndim >= 2 for p in decay["params"])


def test_ema_matches_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.5)
    shadow = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    for n in range(1, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].num_batches_tracked += 1
        ema.update(model)
        decay = min(0.5, (1 + n) / (10 + n))  # warm-up: 2/11, 3/12, ... reaches 0.5 at n = 8
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                shadow[key] = decay * shadow[key] + (1 - decay) * value.double()
            else:
                shadow[key] = value.double()
        for key in shadow:
            torch.testing.assert_close(ema.shadow[key].double(), shadow[key], rtol=1e-6, atol=1e-6)
    assert ema.n_updates == 12
    assert ema.shadow["1.num_batches_tracked"].item() == 12


def test_ema_first_update_weights_the_new_value_by_nine_elevenths():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(11.0)
    ema.update(model)
    assert ema.shadow["weight"].item() == pytest.approx(9.0)


def test_ema_state_round_trip():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    ema.update(model)
    other = EMA(nn.Linear(2, 2), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.n_updates == 1
    for key in ema.shadow:
        assert torch.equal(other.shadow[key], ema.shadow[key])
