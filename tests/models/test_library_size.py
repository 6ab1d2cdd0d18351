"""Log-normal library-size model: fits per condition, fallbacks from combination to key to global, state."""

import json

import numpy as np
import pytest

from scldm_scale.models.library_size import MIN_CELLS, LibrarySizeModel

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
