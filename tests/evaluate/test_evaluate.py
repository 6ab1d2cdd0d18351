"""`scldm-scale evaluate` end to end on small NB cell sets: records, report, figures, baselines, errors."""

import json
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scldm_scale.config import EvalConfig, HoldoutConfig
from scldm_scale.data.counts import DataError
from scldm_scale.evaluate.conditions import groups
from scldm_scale.evaluate.run import evaluate

N_GENES = 60
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _split(adata: ad.AnnData, n_real: int, seed: int) -> tuple[ad.AnnData, ad.AnnData]:
    rows = np.random.default_rng(seed).permutation(adata.n_obs)
    return adata[np.sort(rows[n_real:])].copy(), adata[np.sort(rows[:n_real])].copy()


@pytest.fixture
def cells(counts_adata):
    """(train, real, generated): disjoint draws of one NB distribution with 3 cell types."""
    train, real = _split(counts_adata(n_cells=450, n_genes=N_GENES, seed=0), n_real=90, seed=0)
    train, generated = _split(train, n_real=90, seed=1)
    return train, real, generated


def _records(out) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())


def _value(records, metric, method="generated", condition="all") -> float:
    hits = [r["value"] for r in records if (r["metric"], r["method"], r["condition"]) == (metric, method, condition)]
    assert len(hits) == 1, (metric, method, condition, len(hits))
    return hits[0]


def test_report_records_and_figures(cells, tmp_path):
    train, real, generated = cells
    evaluate(real, generated, tmp_path, EvalConfig(["cell_type"], n_hvg=40), train=train)
    records = _records(tmp_path)
    assert all(set(r) == {"metric", "condition", "method", "value"} for r in records)
    assert {r["method"] for r in records} >= {"generated", "real_train_cells", "independent_nb"}
    assert {r["condition"] for r in records} == {"all", "cell_type=type_0", "cell_type=type_1", "cell_type=type_2"}
    metrics = {r["metric"] for r in records if r["condition"] == "all"}
    assert metrics == {
        "n_real_cells", "n_cells", "mmd", "wasserstein2", "frechet", "mean_r2", "var_r2", "mean_pearson",
        "var_pearson", "dropout_mae", "one_nn_accuracy", "c2st_accuracy", "precision", "recall", "density", "coverage",
        "de_lfc_pearson", "de_top50_overlap", "de_n_significant",
    }  # fmt: skip
    assert all(np.isfinite(r["value"]) for r in records)
    for name in ("umap.png", "mean_var.png", "metric_by_condition.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    report = (tmp_path / "report.md").read_text()
    assert "| generated |" in report and "| real_train_cells |" in report and "![" in report
    assert "scvi" not in {r["method"] for r in records}  # an optional extra, asked for by name only


def test_the_real_cells_themselves_score_perfectly(cells, tmp_path):
    train, real, _ = cells
    evaluate(real, real.copy(), tmp_path, EvalConfig(["cell_type"], baselines=(), n_hvg=40, plots=False), train=train)
    records = _records(tmp_path)
    assert {r["method"] for r in records} == {"generated"}
    assert _value(records, "mmd") == pytest.approx(0.0, abs=1e-12)
    assert _value(records, "wasserstein2") == pytest.approx(0.0, abs=1e-6)
    assert _value(records, "frechet") == pytest.approx(0.0, abs=1e-6)
    assert _value(records, "mean_r2") == _value(records, "var_r2") == 1.0
    assert _value(records, "dropout_mae") == 0.0
    assert _value(records, "precision") == _value(records, "recall") == 1.0


def test_a_distorted_generator_is_worse_than_the_noise_floor(cells, tmp_path):
    train, real, generated = cells
    distorted = generated.copy()
    # Swap the labels of two cell types: every per-type distribution is now wrong, the pooled one is not.
    labels = distorted.obs["cell_type"].astype(str)
    distorted.obs["cell_type"] = labels.replace({"type_0": "type_1", "type_1": "type_0"}).to_numpy()
    opts = EvalConfig(["cell_type"], baselines=("real_train_cells",), n_hvg=40, plots=False)
    evaluate(real, distorted, tmp_path, opts, train=train)
    records = _records(tmp_path)
    for condition in ("cell_type=type_0", "cell_type=type_1"):
        assert _value(records, "mmd", condition=condition) > 3 * _value(
            records, "mmd", "real_train_cells", condition=condition
        )
        assert _value(records, "c2st_accuracy", condition=condition) > 0.9
    # The untouched type is as good as the noise floor, within the metric's noise.
    assert _value(records, "c2st_accuracy", condition="cell_type=type_2") < 0.75


def test_differing_genes_are_listed_unless_intersected(cells, tmp_path):
    train, real, generated = cells
    fewer = generated[:, 3:].copy()
    with pytest.raises(DataError, match=r"3 genes only in real.*gene_0"):
        evaluate(real, fewer, tmp_path, EvalConfig(["cell_type"], baselines=(), plots=False))
    opts = EvalConfig(["cell_type"], baselines=(), n_hvg=40, plots=False, intersect_genes=True)
    evaluate(real, fewer, tmp_path, opts, train=train)
    assert f"{N_GENES - 3} genes" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.obs.drop(columns="cell_type", inplace=True), "condition keys \\['cell_type'\\]"),
        (lambda a: setattr(a, "X", a.X * -1.0), "negative values"),
        (lambda a: setattr(a, "X", a.X * np.nan), "NaN"),
    ],
)
def test_bad_generated_input_is_refused(cells, tmp_path, mutate, message):
    train, real, generated = cells
    generated = generated.copy()
    generated.X = sp.csr_matrix(generated.X, dtype=np.float64)
    mutate(generated)
    with pytest.raises(DataError, match=message):
        evaluate(real, generated, tmp_path, EvalConfig(["cell_type"], plots=False), train=train)


def test_non_integer_real_counts_are_refused(cells, tmp_path):
    train, real, generated = cells
    real = real.copy()
    real.X = sp.csr_matrix(real.X, dtype=np.float64) * 0.5
    with pytest.raises(DataError, match="real cells: .* non-integer"):
        evaluate(real, generated, tmp_path, EvalConfig(["cell_type"], plots=False), train=train)


def test_groups_cover_values_combinations_and_the_held_out_split():
    real = pd.DataFrame({"line": ["a", "a", "b", "b", "b"], "pert": ["ctrl", "p", "ctrl", "p", "p"]})
    gen = pd.DataFrame({"line": ["a", "b", "b"], "pert": ["p", "p", "ctrl"]})
    got = {name: (r.tolist(), g.tolist()) for name, r, g in groups(real, gen, [{"line": "b", "pert": "p"}])}
    assert got["all"] == ([False, True, True, True, True], [True, True, True])  # (a, ctrl) was not generated
    assert got["line=a"] == ([False, True, False, False, False], [True, False, False])
    assert got["pert=p"] == ([False, True, False, True, True], [True, True, False])
    assert got["line=b, pert=p"] == ([False, False, False, True, True], [False, True, False])
    assert got["unseen"] == ([False, False, False, True, True], [False, True, False])
    assert got["seen"] == ([False, True, True, False, False], [True, False, True])


def test_holdout_needs_training_cells_and_full_combinations(cells, tmp_path):
    train, real, generated = cells
    opts = EvalConfig(["cell_type"], holdout=HoldoutConfig([{"cell_type": "type_0"}]), plots=False)
    with pytest.raises(DataError, match="need the training cells"):
        evaluate(real, generated, tmp_path, opts)
    opts = EvalConfig(["cell_type"], holdout=HoldoutConfig([{"cell_line": "x"}]), plots=False)
    with pytest.raises(DataError, match="must set some of the condition keys"):
        evaluate(real, generated, tmp_path, opts, train=train)


def test_no_condition_key_compares_all_cells(cells, tmp_path):
    train, real, generated = cells
    evaluate(real, generated, tmp_path, EvalConfig([], baselines=("independent_nb",), n_hvg=40), train=train)
    records = _records(tmp_path)
    assert {r["condition"] for r in records} == {"all"}
    assert _value(records, "n_real_cells") == real.n_obs and _value(records, "n_cells") == generated.n_obs
    assert _value(records, "n_cells", "independent_nb") == real.n_obs
    assert not (tmp_path / "metric_by_condition.png").exists()
    assert "metric_by_condition.png" not in (tmp_path / "report.md").read_text()


def test_conditions_on_one_side_only_are_left_out_and_listed(cells, tmp_path):
    train, real, generated = cells
    only_two = generated[generated.obs["cell_type"] != "type_2"].copy()
    opts = EvalConfig(["cell_type"], baselines=("real_train_cells",), n_hvg=40, plots=False)
    evaluate(real, only_two, tmp_path, opts, train=train)
    records = _records(tmp_path)
    assert _value(records, "n_real_cells") == int((real.obs["cell_type"] != "type_2").sum())
    assert _value(records, "n_real_cells", "real_train_cells") == real.n_obs
    assert (
        "generated: no cells of 1 real combination(s), e.g. ['cell_type=type_2']"
        in (tmp_path / "report.md").read_text()
    )
    renamed = generated.copy()
    renamed.obs["cell_type"] = "other"
    with pytest.raises(DataError, match="no condition combination is shared"):
        evaluate(real, renamed, tmp_path, opts, train=train)


def _perturbation_cells():
    from scldm_scale.data.synthetic import synthetic_perturbation

    cells = synthetic_perturbation(n_cells_per_group=40, n_genes=80, n_perturbations=2, seed=0)
    cells.obs["split"] = np.where(np.arange(cells.n_obs) % 4 == 0, "test", "train")
    return cells


def test_cli_splits_by_the_split_column_and_holds_out_combinations(tmp_path, capsys):
    from scldm_scale.cli import main

    cells = _perturbation_cells()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    held = (cells.obs["cell_line"] == "line_B") & (cells.obs["perturbation"] == "pert_2")
    # A stand-in for a model: real cells of every combination the evaluation asks for.
    cells[held | (cells.obs["split"] == "test").to_numpy()].write_h5ad(tmp_path / "gen.h5ad")
    args = ["evaluate", "--real", str(tmp_path / "cells.h5ad"), "--generated", str(tmp_path / "gen.h5ad")]
    args += ["--condition-key", "cell_line", "--condition-key", "perturbation", "--n-hvg", "40", "--no-plots"]
    args += ["--holdout", "cell_line=line_B,perturbation=pert_2", "--out", str(tmp_path / "eval")]
    assert main(args) == 0
    records = _records(tmp_path / "eval")
    # Every held-out cell is a real cell, none is a training cell: only additive_shift covers "unseen".
    assert _value(records, "n_real_cells", condition="unseen") == int(held.sum())
    assert {r["method"] for r in records if r["condition"] == "unseen"} == {"generated", "additive_shift"}
    assert _value(records, "mmd", condition="unseen") == pytest.approx(0.0, abs=1e-12)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Held-out combinations" in report and "| unseen | additive_shift |" in report


def test_additive_shift_needs_a_context_and_perturbation_pair(tmp_path):
    cells = _perturbation_cells()
    train, real = cells[cells.obs["split"] == "train"].copy(), cells[cells.obs["split"] == "test"].copy()
    opts = EvalConfig(
        ["cell_line", "perturbation"],
        baselines=("additive_shift",),
        holdout=HoldoutConfig([{"perturbation": "pert_1"}]),
    )
    opts.plots, opts.n_hvg = False, 40
    evaluate(real, real.copy(), tmp_path, opts, train=train)
    assert (
        "additive_shift: perturbation=pert_1 is not a (cell_line, perturbation) pair"
        in (tmp_path / "report.md").read_text()
    )
    bad_control = EvalConfig(
        ["cell_line", "perturbation"],
        holdout=HoldoutConfig([{"cell_line": "line_A", "perturbation": "pert_1"}], control_value="ctrl"),
        plots=False,
        n_hvg=40,
    )
    with pytest.raises(DataError, match="control-value"):
        evaluate(real, real.copy(), tmp_path, bad_control, train=train)


def test_several_draws_are_scored_each_with_its_own_seed_and_averaged(cells, tmp_path):
    """Draw d is scored as a single evaluation with seed + d would score it; metrics.json holds the means."""
    train, real, generated = cells
    second = generated[::-1].copy()  # another draw: the same cells in another order move the seeded subsamples
    x = np.asarray(second.X.todense() if sp.issparse(second.X) else second.X).copy()
    x[:, 0] += 1  # and one gene differs, so the two draws' scores differ
    second.X = sp.csr_matrix(x)
    opts = EvalConfig(["cell_type"], baselines=("real_train_cells",), n_hvg=40, plots=False, seed=3)
    evaluate(real, [generated, second], tmp_path / "both", opts, train=train)
    evaluate(real, second, tmp_path / "single", replace(opts, seed=4), train=train)
    both, single = _records(tmp_path / "both"), _records(tmp_path / "single")
    assert all(set(r) == {"metric", "condition", "method", "value"} for r in both)
    every = json.loads((tmp_path / "both" / "metrics_draws.json").read_text())
    draw = [
        [{k: r[k] for k in ("metric", "condition", "method", "value")} for r in every if r["draw"] == d] for d in (0, 1)
    ]
    assert draw[1] == single  # draw 1 is scored exactly as a single evaluation with seed 3 + 1
    assert len(draw[0]) == len(both) == len(single)
    for metric in ("mmd", "frechet", "c2st_accuracy", "de_lfc_pearson"):
        for method in ("generated", "real_train_cells"):
            values = [_value(d, metric, method) for d in draw]
            assert _value(both, metric, method) == pytest.approx(np.mean(values), rel=1e-12)
    assert _value(draw[0], "mmd") != _value(draw[1], "mmd")
    # the noise floor is drawn again with each draw's seed
    assert _value(draw[0], "mmd", "real_train_cells") != _value(draw[1], "mmd", "real_train_cells")
    report = (tmp_path / "both" / "report.md").read_text()
    assert "## 2 generation draws" in report and "seed 3 + d" in report
    assert not (tmp_path / "single" / "metrics_draws.json").exists()
    with pytest.raises(DataError, match="--generated"):
        evaluate(real, [], tmp_path / "none", opts, train=train)
