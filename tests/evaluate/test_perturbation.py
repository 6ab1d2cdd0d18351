"""`additive_shift_baseline`: exact on a hand-built case where the perturbation's log-normalised shift is the
same in every context, close to the truth on synthetic data whose effects transfer fully, seeded, and
clear refusals."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scldm_scale.data.holdout import holdout_mask
from scldm_scale.data.synthetic import synthetic_perturbation
from scldm_scale.evaluate.metrics import normalize_log1p
from scldm_scale.evaluate.perturbation import additive_shift_baseline

TARGET = {"cell_line": "c0", "perturbation": "swap"}


def _swap_case() -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Cells of 10,000 counts: genes 0 and 1 hold y and 2y + 1; the perturbation `swap` exchanges them.

    In log1p(x / 10,000 · 1e4) = log1p(x) terms the swap adds log 2 to gene 0 and -log 2 to gene 1
    (log1p(2y + 1) - log1p(y) = log 2) and keeps the total, so when each context's swap cells are its
    control cells swapped, the mean shift is exactly (log 2, -log 2, 0, ...) in every context: the effect
    transfers exactly. Returns all cells, their labels, and the truth: the (c0, swap) cells.
    """
    rng = np.random.default_rng(0)
    cells, labels = [], []
    for context in ("c0", "c1", "c2"):
        y = rng.integers(0, 400, 7)  # (7,)
        rest = np.stack([rng.multinomial(10_000 - (3 * v + 1), np.full(5, 0.2)) for v in y])  # (7, 5) genes 2..6
        control = np.column_stack([y, 2 * y + 1, rest])  # (7, 7)
        cells += [control, control[:, [1, 0, 2, 3, 4, 5, 6]]]
        labels += [(context, "control")] * 7 + [(context, "swap")] * 7
    counts = np.concatenate(cells)
    obs = pd.DataFrame(labels, columns=["cell_line", "perturbation"])
    truth = counts[holdout_mask(obs, [TARGET])]
    return counts, obs, truth


def test_exact_when_the_shift_transfers_exactly():
    counts, obs, truth = _swap_case()
    train = ~holdout_mask(obs, [TARGET])
    baseline = additive_shift_baseline(sp.csr_matrix(counts[train]), obs[train].reset_index(drop=True), TARGET, 50, 0)
    assert baseline.shape == (50, counts.shape[1]) and baseline.dtype == np.int64
    # Each baseline cell is one of the held-out (c0, swap) cells: a control cell of c0, swapped.
    truth_cells = {tuple(c) for c in truth}
    assert {tuple(c) for c in baseline} <= truth_cells
    assert len({tuple(c) for c in baseline}) > 1
    # Drawn with replacement from the 7 control cells, the baseline's mean log-expression is that of the
    # truth's cells with the same multiplicities.
    controls = counts[((obs["cell_line"] == "c0") & (obs["perturbation"] == "control")).to_numpy()]
    shift = normalize_log1p(baseline).mean(0) - normalize_log1p(controls[_rows_of(baseline, truth)]).mean(0)
    np.testing.assert_allclose(shift, [np.log(2), -np.log(2), 0, 0, 0, 0, 0], atol=1e-12)


def _rows_of(cells: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Row of `table` equal to each cell."""
    return np.array([int(np.flatnonzero((table == c).all(axis=1))[0]) for c in cells])


def test_close_to_the_truth_when_synthetic_effects_transfer_fully():
    # Deep libraries: log1p of normalised counts is then close to the log of the NB mean, in which the
    # synthetic effects are additive (at low depth log1p bends the shift, and the baseline is only close).
    adata = synthetic_perturbation(
        n_cells_per_group=200, n_genes=200, shared_fraction=1.0, median_library_size=3000.0, seed=3
    )
    target = {"cell_line": "line_B", "perturbation": "pert_1"}
    held = holdout_mask(adata.obs, [target])
    train_obs = adata.obs[~held].reset_index(drop=True)
    baseline = additive_shift_baseline(adata.X[~held], train_obs, target, 300, seed=0)
    truth_mean = normalize_log1p(adata.X[held]).mean(0)
    control = ((adata.obs["cell_line"] == "line_B") & (adata.obs["perturbation"] == "control")).to_numpy()
    control_mean = normalize_log1p(adata.X[control]).mean(0)
    baseline_mean = normalize_log1p(baseline).mean(0)
    affected = adata.uns["synthetic_truth"]["log_fold_change"][1, 1] != 0
    # On the affected genes the baseline moves the control most of the way to the truth.
    error, no_shift_error = (np.abs(m - truth_mean)[affected].mean() for m in (baseline_mean, control_mean))
    assert error < 0.35 * no_shift_error
    assert np.corrcoef(baseline_mean - control_mean, truth_mean - control_mean)[0, 1] > 0.9


def test_a_seed_gives_the_same_cells():
    counts, obs, _ = _swap_case()
    train = ~holdout_mask(obs, [TARGET])
    x, o = counts[train], obs[train].reset_index(drop=True)
    first, again, other = (additive_shift_baseline(x, o, TARGET, 30, s) for s in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_negative_shifts_clip_at_zero():
    # Gene 0 is lost under the perturbation in the other context and is 0 in the target's control cells.
    counts = np.array([[0, 10], [0, 12], [5, 10], [0, 9]])
    obs = pd.DataFrame({"cell_line": ["a", "a", "b", "b"], "perturbation": ["control", "control", "control", "p"]})
    baseline = additive_shift_baseline(counts, obs, {"cell_line": "a", "perturbation": "p"}, 4, 0)
    assert (baseline[:, 0] == 0).all() and (baseline[:, 1] > 0).all()


@pytest.mark.parametrize(
    ("target", "labels", "message"),
    [
        ({"cell_line": "a", "perturbation": "p"}, [("a", "q"), ("b", "control"), ("b", "p")], "no control cells"),
        ({"cell_line": "a", "perturbation": "p"}, [("a", "control"), ("b", "control"), ("b", "q")], "in no cell_line"),
        ({"cell_line": "a", "perturbation": "p"}, [("a", "control"), ("b", "p")], "none of them has control cells"),
        ({"cell_line": "a", "perturbation": "control"}, [("a", "control")], "is the control"),
        ({"cell_line": "a"}, [("a", "control")], "must set exactly"),
    ],
)
def test_refusals_say_what_is_missing(target, labels, message):
    obs = pd.DataFrame(labels, columns=["cell_line", "perturbation"])
    counts = np.ones((len(obs), 3), dtype=np.int64)
    with pytest.raises(ValueError, match=message):
        additive_shift_baseline(counts, obs, target, 5, 0)
