"""DiT prior: shapes, adaLN-Zero at init, NULL conditions, condition dropout and classifier-free guidance."""

import math

import pytest
import torch

from scldm_scale.config import PriorConfig
from scldm_scale.models.dit import DiT, drop_conditions, sinusoidal_embedding
from scldm_scale.models.prior import FlowMatchingPrior, LatentBatch
from scldm_scale.models.sampling import guided_velocity

N_CLASSES = {"cell_type": 5, "donor": 3}
M, L = 4, 6


def _dit(n_layers: int = 2) -> DiT:
    return DiT(PriorConfig(d_model=32, n_heads=4, n_layers=n_layers, mlp_ratio=2.0), M, L, N_CLASSES)


def _randomise_zero_init(dit: DiT, seed: int) -> None:
    """Give the adaLN-Zero modulations and the output layer weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    layers = [block.ada_ln[-1] for block in dit.blocks] + [dit.final_ada_ln[-1], dit.final]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.1)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)


def _inputs(batch: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, M, L, generator=generator)
    t = torch.rand(batch, generator=generator)
    conditions = {
        "cell_type": torch.randint(5, (batch,), generator=generator),
        "donor": torch.randint(3, (batch,), generator=generator),
    }
    return x, t, conditions


def test_output_shape_and_null_ids():
    torch.manual_seed(0)
    dit = _dit()
    x, t, conditions = _inputs()
    assert dit(x, t, conditions).shape == (5, M, L)
    assert dit.null_ids == {"cell_type": 5, "donor": 3}
    assert dit.cond_embed["cell_type"].num_embeddings == 6  # 5 classes + NULL


def test_output_is_exactly_zero_at_init():
    torch.manual_seed(0)
    dit = _dit()
    x, t, conditions = _inputs()
    assert torch.equal(dit(x, t, conditions), torch.zeros(5, M, L))


def test_blocks_are_the_identity_at_init():
    torch.manual_seed(0)
    dit = _dit()
    h = torch.randn(3, M, 32)
    c = torch.randn(3, 32)
    for block in dit.blocks:
        assert torch.equal(block(h, c), h)


def test_sinusoidal_embedding_formula():
    values = torch.tensor([0.0, 1.5, 250.0])
    emb = sinusoidal_embedding(values, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(values[:, None] * freqs), torch.sin(values[:, None] * freqs)], dim=-1)
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-5)


def test_missing_condition_key_equals_the_null_id():
    torch.manual_seed(0)
    dit = _dit()
    _randomise_zero_init(dit, 1)
    x, t, conditions = _inputs()
    null_donor = torch.full((5,), dit.null_ids["donor"])
    only_cell_type = dit(x, t, {"cell_type": conditions["cell_type"]})
    assert torch.equal(only_cell_type, dit(x, t, {"cell_type": conditions["cell_type"], "donor": null_donor}))
    assert not torch.allclose(only_cell_type, dit(x, t, conditions))
    all_null = {k: torch.full((5,), n) for k, n in dit.null_ids.items()}
    assert torch.equal(dit(x, t, {}), dit(x, t, all_null))


def test_velocity_depends_on_time_and_is_per_sample():
    torch.manual_seed(0)
    dit = _dit()
    _randomise_zero_init(dit, 2)
    x, t, conditions = _inputs()
    v = dit(x, t, conditions)
    assert not torch.allclose(v, dit(x, 1.0 - t, conditions))
    # No interaction across the batch: one cell alone gives the same velocity.
    single = dit(x[2:3], t[2:3], {k: c[2:3] for k, c in conditions.items()})
    torch.testing.assert_close(single[0], v[2], rtol=1e-5, atol=1e-6)


# --- drop_conditions -----------------------------------------------------------------------------------


def _labels(n: int = 4000):
    generator = torch.Generator().manual_seed(7)
    return {k: torch.randint(c, (n,), generator=generator) for k, c in N_CLASSES.items()}


def _is_null(dropped: dict) -> dict:
    return {k: v == N_CLASSES[k] for k, v in dropped.items()}


@pytest.mark.parametrize("mode", ["independent", "joint", "one_at_a_time"])
def test_drop_probability_zero_and_one(mode):
    labels = _labels()
    generator = torch.Generator().manual_seed(0)
    dropped_all = drop_conditions(labels, N_CLASSES, 1.0, mode, generator)
    assert all(is_null.all() for is_null in _is_null(dropped_all).values())
    kept = drop_conditions(labels, N_CLASSES, 0.0, mode, generator)
    if mode == "one_at_a_time":
        # p = 0 keeps the active key of every cell; exactly one key is non-NULL per cell.
        n_active = sum((~is_null).long() for is_null in _is_null(kept).values())
        assert (n_active == 1).all()
        for key in labels:
            active = ~_is_null(kept)[key]
            assert torch.equal(kept[key][active], labels[key][active])
    else:
        for key in labels:
            assert torch.equal(kept[key], labels[key])


def test_joint_drops_all_keys_of_a_cell_together():
    dropped = drop_conditions(_labels(), N_CLASSES, 0.3, "joint", torch.Generator().manual_seed(1))
    is_null = _is_null(dropped)
    assert torch.equal(is_null["cell_type"], is_null["donor"])
    assert is_null["cell_type"].float().mean().item() == pytest.approx(0.3, abs=0.03)


def test_independent_drops_keys_separately():
    dropped = drop_conditions(_labels(), N_CLASSES, 0.5, "independent", torch.Generator().manual_seed(2))
    is_null = _is_null(dropped)
    for key in N_CLASSES:
        assert is_null[key].float().mean().item() == pytest.approx(0.5, abs=0.03)
    both = (is_null["cell_type"] & is_null["donor"]).float().mean().item()
    assert both == pytest.approx(0.25, abs=0.03)


def test_one_at_a_time_leaves_at_most_one_key_per_cell():
    labels = _labels()
    dropped = drop_conditions(labels, N_CLASSES, 0.2, "one_at_a_time", torch.Generator().manual_seed(3))
    is_null = _is_null(dropped)
    n_active = sum((~v).long() for v in is_null.values())
    assert (n_active <= 1).all()
    assert (n_active == 0).float().mean().item() == pytest.approx(0.2, abs=0.03)
    # Each key is the active one for about half of the cells that keep one.
    share = (~is_null["cell_type"]).float().sum() / (n_active == 1).sum()
    assert share.item() == pytest.approx(0.5, abs=0.04)
    for key in labels:
        active = ~is_null[key]
        assert torch.equal(dropped[key][active], labels[key][active])


def test_drop_conditions_edge_cases():
    assert drop_conditions({}, {}, 0.5, "joint") == {}
    with pytest.raises(ValueError, match="unknown condition dropout mode 'sometimes'"):
        drop_conditions(_labels(10), N_CLASSES, 0.5, "sometimes")


# --- guidance with the real DiT ---------------------------------------------------------------------


def test_zero_guidance_weight_is_the_unconditional_prediction():
    torch.manual_seed(0)
    dit = _dit()
    _randomise_zero_init(dit, 4)
    x, t, conditions = _inputs()
    with torch.no_grad():
        unconditional = dit(x, t, {})
        guided = guided_velocity(dit, x, t, conditions, {"cell_type": 0.0, "donor": 0.0}, dit.null_ids)
        conditional = dit(x, t, conditions)
    torch.testing.assert_close(guided, unconditional, rtol=1e-5, atol=1e-6)
    assert (conditional - unconditional).abs().max() > 1e-3  # conditioning does change the velocity


def test_guidance_combines_separate_dit_calls():
    torch.manual_seed(0)
    dit = _dit()
    _randomise_zero_init(dit, 5)
    x, t, conditions = _inputs()
    weights = {"cell_type": 2.5, "donor": 0.5}
    with torch.no_grad():
        v_null = dit(x, t, {})
        v_cell = dit(x, t, {"cell_type": conditions["cell_type"]})
        v_donor = dit(x, t, {"donor": conditions["donor"]})
        v_joint = dit(x, t, conditions)
        compositional = guided_velocity(dit, x, t, conditions, weights, dit.null_ids)
        joint = guided_velocity(dit, x, t, conditions, 3.0, dit.null_ids, mode="joint")
        plain = guided_velocity(dit, x, t, conditions, 1.0, dit.null_ids, mode="joint")
    expected = v_null + 2.5 * (v_cell - v_null) + 0.5 * (v_donor - v_null)
    torch.testing.assert_close(compositional, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joint, v_null + 3.0 * (v_joint - v_null), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, v_joint, rtol=1e-5, atol=1e-6)


# --- flow-matching objective ------------------------------------------------------------------------


def test_flow_matching_loss_at_init_is_the_target_energy():
    # At init the DiT predicts zero, so the loss is mean((x1 - x0)^2) = E|x1|^2 + 1 per element.
    torch.manual_seed(0)
    prior = FlowMatchingPrior(_dit(), cond_drop_prob=0.2, cond_dropout="independent")
    latents = 0.5 * torch.randn(4096, M, L)
    loss, metrics = prior(LatentBatch(latents, _labels(4096)))
    assert loss.item() == pytest.approx(1.25, rel=0.02)
    assert metrics["fm_loss"].item() == loss.item()


def test_flow_matching_gradients_reach_the_zero_initialised_layers():
    torch.manual_seed(0)
    prior = FlowMatchingPrior(_dit(n_layers=1), cond_drop_prob=0.5, cond_dropout="joint")
    loss, _ = prior(LatentBatch(torch.randn(16, M, L), _labels(16)))
    loss.backward()
    assert prior.dit.final.weight.grad.abs().sum() > 0
    assert math.isfinite(loss.item())
