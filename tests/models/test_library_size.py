"""Library-size models: log-normal per condition (fallbacks from combination to key to global, state), and
given the latent (ridge fit against sklearn and a brute-force leave-one-out, recovery, state)."""

import json

import numpy as np
import pytest
import torch

from scldm_scale.models.library_size import MIN_CELLS, LatentLibrarySize, LibrarySizeModel

# (cell_type, donor) -> (mean, std) of log library size and number of cells.
TRUE = {
    ("B", "d1"): (7.0, 0.2, 3000),
    ("B", "d2"): (7.4, 0.3, 3000),
    ("T", "d1"): (8.5, 0.5, 3000),
    ("T", "d2"): (8.0, 0.4, 2),  # too few cells for a combination fit
}


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes, cell_types, donors = [], [], []
    for (cell_type, donor), (mean, std, n) in TRUE.items():
        sizes.append(np.exp(rng.normal(mean, std, n)))
        cell_types += [cell_type] * n
        donors += [donor] * n
    return np.concatenate(sizes), {"cell_type": np.array(cell_types), "donor": np.array(donors)}


def test_fit_recovers_each_combination():
    sizes, labels = _data()
    model = LibrarySizeModel.fit(sizes, labels)
    for (cell_type, donor), (mean, std, n) in TRUE.items():
        if n < MIN_CELLS:
            continue
        got_mean, got_std = model.params({"cell_type": cell_type, "donor": donor})
        assert got_mean == pytest.approx(mean, abs=5 * std / np.sqrt(n))
        assert got_std == pytest.approx(std, rel=0.05)


def test_fit_per_key_and_global_match_numpy():
    sizes, labels = _data()
    model = LibrarySizeModel.fit(sizes, labels)
    log_sizes = np.log(sizes)
    for value in ("B", "T"):
        sel = labels["cell_type"] == value
        assert model.fits["cell_type"][value] == pytest.approx((log_sizes[sel].mean(), log_sizes[sel].std(ddof=1)))
    assert model.params({}) == pytest.approx((log_sizes.mean(), log_sizes.std(ddof=1)))


def test_sample_recovers_the_log_normal():
    sizes, labels = _data()
    model = LibrarySizeModel.fit(sizes, labels)
    rng = np.random.default_rng(1)
    drawn = model.sample(100_000, {"cell_type": "B", "donor": "d2"}, rng)
    assert (drawn > 0).all()
    assert np.log(drawn).mean() == pytest.approx(7.4, abs=0.01)
    assert np.log(drawn).std() == pytest.approx(0.3, rel=0.02)


def test_combination_with_too_few_cells_falls_back_to_the_first_key():
    sizes, labels = _data()
    model = LibrarySizeModel.fit(sizes, labels)
    assert ("T" + "\x1f" + "d2") not in model.fits["__combination__"]
    assert model.params({"cell_type": "T", "donor": "d2"}) == model.fits["cell_type"]["T"]


def test_partial_and_unknown_conditions_fall_back():
    sizes, labels = _data()
    model = LibrarySizeModel.fit(sizes, labels)
    assert model.params({"donor": "d1"}) == model.fits["donor"]["d1"]
    assert model.params({"cell_type": "NK", "donor": "d2"}) == model.fits["donor"]["d2"]
    assert model.params({"cell_type": "NK"}) == model.fits["__global__"][""]


def test_rare_values_get_no_fit():
    sizes = np.array([100.0, 120.0, 90.0, 110.0, 5000.0, 6000.0])
    labels = {"cell_type": np.array(["a", "a", "a", "a", "rare", "rare"])}
    model = LibrarySizeModel.fit(sizes, labels)
    assert "rare" not in model.fits["cell_type"]
    assert model.params({"cell_type": "rare"}) == model.fits["__global__"][""]


def test_state_round_trip_is_json_and_samples_identically():
    sizes, labels = _data()
    model = LibrarySizeModel.fit(sizes, labels)
    state = json.loads(json.dumps(model.state_dict()))
    again = LibrarySizeModel.from_state(state)
    assert again.keys == ["cell_type", "donor"]
    for condition in ({"cell_type": "B", "donor": "d1"}, {"cell_type": "T", "donor": "d2"}, {"donor": "d2"}, {}):
        assert again.params(condition) == model.params(condition)
        np.testing.assert_array_equal(
            again.sample(50, condition, np.random.default_rng(3)), model.sample(50, condition, np.random.default_rng(3))
        )


def test_no_condition_keys_uses_the_global_fit():
    sizes = np.exp(np.random.default_rng(4).normal(6.0, 0.5, 5000))
    model = LibrarySizeModel.fit(sizes, {})
    mean, std = model.params({})
    assert mean == pytest.approx(6.0, abs=0.03)
    assert std == pytest.approx(0.5, rel=0.05)


# ---- LatentLibrarySize: log L given the standardised latent, by ridge regression -----------------------------


def _latent_data(n: int, noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 3, 5, generator=g)  # (N, M, L)
    weight = torch.randn(3, 5, generator=g) * 0.1
    log_sizes = 7.0 + (latents * weight).sum((1, 2)) + noise * torch.randn(n, generator=g)
    return latents, log_sizes.exp().numpy(), weight


def test_latent_fit_equals_sklearn_ridge_and_its_std_is_the_leave_one_out_error():
    from sklearn.linear_model import Ridge

    latents, sizes, _ = _latent_data(120, noise=0.3)
    fit = LatentLibrarySize.fit(latents, sizes)
    x, y = latents.flatten(1).double().numpy(), np.log(sizes)
    reference = Ridge(alpha=fit.alpha).fit(x, y)
    np.testing.assert_allclose(fit.weight.flatten().numpy(), reference.coef_, atol=1e-6)
    assert fit.bias == pytest.approx(reference.intercept_, abs=1e-6)
    errors = []  # refit without each cell in turn, intercept included
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        errors.append(y[i] - Ridge(alpha=fit.alpha).fit(x[keep], y[keep]).predict(x[i : i + 1])[0])
    assert fit.std == pytest.approx(np.sqrt(np.mean(np.square(errors))), rel=1e-6)
    assert fit.loo_r2 == pytest.approx(1 - np.mean(np.square(errors)) / y.var(), rel=1e-6)
    assert fit.n_cells == 120


def test_latent_fit_recovers_the_relation_and_its_noise():
    latents, sizes, weight = _latent_data(5000, noise=0.2)
    fit = LatentLibrarySize.fit(latents, sizes)
    assert (fit.weight - weight).abs().max() < 0.02
    assert fit.bias == pytest.approx(7.0, abs=0.01)
    assert fit.std == pytest.approx(0.2, rel=0.05)
    drawn = fit.sample(latents[:1].expand(20_000, -1, -1), np.random.default_rng(0).standard_normal(20_000))
    expected = 7.0 + float((latents[0] * weight).sum())
    assert np.log(drawn.numpy()).mean() == pytest.approx(expected, abs=0.02)
    assert np.log(drawn.numpy()).std() == pytest.approx(0.2, rel=0.05)


def test_latent_fit_without_signal_falls_to_the_mean_and_full_spread():
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(400, 2, 4, generator=g)
    sizes = np.exp(np.random.default_rng(2).normal(6.0, 0.5, 400))  # independent of the latents
    fit = LatentLibrarySize.fit(latents, sizes)
    assert fit.loo_r2 < 0.02
    assert fit.std == pytest.approx(np.log(sizes).std(), rel=0.05)
    assert fit.weight.abs().max() < 0.05


def test_latent_fit_in_blocks_and_on_a_subset():
    latents, sizes, _ = _latent_data(300, noise=0.3)
    whole, blocks = LatentLibrarySize.fit(latents, sizes), LatentLibrarySize.fit(latents, sizes, chunk=7)
    assert blocks.alpha == whole.alpha and blocks.std == pytest.approx(whole.std, rel=1e-9)
    torch.testing.assert_close(blocks.weight, whole.weight)
    import scldm_scale.models.library_size as library_size

    original = library_size.MAX_FIT_CELLS
    library_size.MAX_FIT_CELLS = 100
    try:
        subset = LatentLibrarySize.fit(latents, sizes, seed=3)
        again = LatentLibrarySize.fit(latents, sizes, seed=3)
    finally:
        library_size.MAX_FIT_CELLS = original
    assert subset.n_cells == 100 and subset.std == again.std  # seeded: the same subset


def test_latent_fit_keeps_the_predicted_mean_within_the_training_range():
    latents, sizes, _ = _latent_data(300, noise=0.1)
    fit = LatentLibrarySize.fit(latents, sizes)
    assert fit.log_range == pytest.approx((np.log(sizes).min(), np.log(sizes).max()))
    far = latents[:2] * 1e6  # far outside the training cloud (strong guidance, an undertrained prior)
    drawn = fit.sample(far, np.zeros(2)).double().log()
    assert torch.isfinite(drawn).all()
    assert set(np.round(drawn.numpy(), 6)) <= set(np.round(fit.log_range, 6))


def test_latent_fit_refuses_bad_input():
    latents, sizes, _ = _latent_data(10, noise=0.1)
    with pytest.raises(ValueError, match="10 latents but 9 library sizes"):
        LatentLibrarySize.fit(latents, sizes[:9])
    with pytest.raises(ValueError, match="positive"):
        LatentLibrarySize.fit(latents, np.r_[sizes[:9], 0.0])
    with pytest.raises(ValueError, match="at least 3 cells"):
        LatentLibrarySize.fit(latents[:2], sizes[:2])


def test_latent_fit_state_round_trip_samples_identically():
    latents, sizes, _ = _latent_data(200, noise=0.3)
    fit = LatentLibrarySize.fit(latents, sizes)
    again = LatentLibrarySize.from_state(json.loads(json.dumps(fit.state_dict())), fit.weight.clone())
    noise = np.random.default_rng(5).standard_normal(10)
    torch.testing.assert_close(again.sample(latents[:10], noise), fit.sample(latents[:10], noise))
