"""Differential-expression recovery (evaluate/de.py): known answers on small NB cell sets."""

import json

import numpy as np
import pandas as pd
import pytest

from scldm_scale.config import EvalConfig
from scldm_scale.evaluate.de import de_records, de_test
from scldm_scale.evaluate.metrics import normalize_log1p
from scldm_scale.evaluate.run import evaluate

N_TOP = 20


@pytest.fixture(scope="module")
def two_draws():
    """(labels, log-normalised cells) twice: two disjoint draws of one NB distribution with 3 cell types."""
    from tests.conftest import make_counts_adata

    adata = make_counts_adata(n_cells=252, n_genes=120, seed=0)  # 42 cells of each type in each draw
    labels = pd.DataFrame({"cell_type": adata.obs["cell_type"].astype(str).to_numpy()})
    lognorm = normalize_log1p(adata.X)
    return tuple((labels.iloc[half::2].reset_index(drop=True), lognorm[half::2]) for half in (0, 1))


def _by(records, method, metric):
    return {r["condition"]: r["value"] for r in records if (r["method"], r["metric"]) == (method, metric)}


def _scrambled(labels: pd.DataFrame) -> pd.DataFrame:
    """Labels that say nothing about the cells: within each true type the labels cycle through all types, so
    every labelled group holds the same mix of true types (exactly, when each type's count divides by 3)."""
    true = labels["cell_type"].to_numpy()
    types = np.unique(true)
    out = np.empty(len(true), dtype=object)
    for t in types:
        rows = np.flatnonzero(true == t)
        out[rows] = types[(np.arange(len(rows)) + np.flatnonzero(types == t)[0]) % len(types)]
    return pd.DataFrame({"cell_type": out})


def test_a_copy_recovers_everything_a_fresh_draw_nearly_and_scrambled_labels_nothing(two_draws):
    (labels, real), (other_labels, other) = two_draws
    methods = {"copy": (labels, real), "fresh": (other_labels, other), "scrambled": (_scrambled(other_labels), other)}
    records = de_records(labels, real, methods, seed=0, n_top=N_TOP)
    conditions = {"all", "cell_type=type_0", "cell_type=type_1", "cell_type=type_2"}
    for method in methods:
        assert set(_by(records, method, "de_lfc_pearson")) == conditions
    assert all(v == pytest.approx(1.0) for v in _by(records, "copy", "de_lfc_pearson").values())
    assert all(v == 1.0 for v in _by(records, "copy", "de_top50_overlap").values())
    fresh_r, fresh_overlap = _by(records, "fresh", "de_lfc_pearson"), _by(records, "fresh", "de_top50_overlap")
    assert min(fresh_r.values()) > 0.95 and min(fresh_overlap.values()) >= 0.7
    scrambled = {k: _by(records, "scrambled", k)["all"] for k in ("de_lfc_pearson", "de_top50_overlap")}
    assert abs(scrambled["de_lfc_pearson"]) < 0.25 and scrambled["de_top50_overlap"] < 0.3
    # Most genes differ between the types (each has its own random mean profile).
    assert min(_by(records, "copy", "de_n_significant").values()) > 60


def test_de_test_finds_a_planted_gene_and_not_a_constant_one():
    rng = np.random.default_rng(0)
    counts = rng.poisson(5.0, size=(60, 30)).astype(float)
    in_group = np.arange(60) < 20
    # Gene 0 up 8-fold in the group and gene 2 down as much, so library sizes (and gene 1) do not move.
    counts[:, 0] = np.where(in_group, rng.poisson(40.0, 60), rng.poisson(5.0, 60))
    counts[:, 2] = np.where(in_group, rng.poisson(5.0, 60), rng.poisson(40.0, 60))
    counts[:, 1] = 3
    result = de_test(normalize_log1p(counts), in_group, seed=0)
    assert result.ranking[0] == 0 and result.ranking[-1] == 2
    assert max(result.pvals_adj[0], result.pvals_adj[2]) < 1e-6
    assert result.lfc[0] == pytest.approx(np.log2(8), abs=0.5) and result.lfc[2] == pytest.approx(-np.log2(8), abs=0.5)
    assert result.pvals_adj[1] > 0.05 and abs(result.lfc[1]) < 0.3
    with pytest.raises(ValueError, match="cells on each side"):
        de_test(normalize_log1p(counts), np.arange(60) < 2)


def test_small_values_are_noted_not_scored(two_draws):
    (labels, real), _ = two_draws
    labels = labels.copy()
    labels.loc[:1, "cell_type"] = "rare"  # two cells: too few for a test
    notes: list[str] = []
    records = de_records(labels, real, {"copy": (labels, real)}, n_top=N_TOP, notes=notes)
    assert "cell_type=rare" not in _by(records, "copy", "de_top50_overlap")
    assert any("cell_type=rare" in n and "needs 3" in n for n in notes)


def test_evaluate_writes_de_records_and_table(counts_adata, tmp_path):
    adata = counts_adata(n_cells=150, n_genes=40, seed=0)
    train, real = adata[:90].copy(), adata[90:].copy()
    opts = EvalConfig(["cell_type"], baselines=("real_train_cells",), n_hvg=30, n_pcs=10, plots=False)
    evaluate(real, real.copy(), tmp_path, opts, train=train)
    records = json.loads((tmp_path / "metrics.json").read_text())
    assert _by(records, "generated", "de_top50_overlap")["all"] == 1.0
    assert _by(records, "generated", "de_lfc_pearson")["all"] == pytest.approx(1.0)
    assert 0.5 < _by(records, "real_train_cells", "de_lfc_pearson")["all"] < 1
    report = (tmp_path / "report.md").read_text()
    assert "## Differential expression recovered" in report and "| cell_type=type_0 |" in report
    no_de = EvalConfig(["cell_type"], baselines=(), n_hvg=30, n_pcs=10, plots=False, de=False)
    evaluate(real, real.copy(), tmp_path / "no_de", no_de, train=train)
    assert not any(r["metric"].startswith("de_") for r in json.loads((tmp_path / "no_de" / "metrics.json").read_text()))


def test_large_sides_are_subsampled_under_the_seed(monkeypatch):
    from scldm_scale.evaluate import de

    rng = np.random.default_rng(1)
    counts = rng.poisson(5.0, size=(200, 20)).astype(float)
    in_group = np.arange(200) < 100
    counts[in_group, 0] = rng.poisson(40.0, 100)
    lognorm = normalize_log1p(counts)
    monkeypatch.setattr(de, "MAX_CELLS", 15)
    first, again, other = (de_test(lognorm, in_group, seed=s) for s in (0, 0, 1))
    assert first.ranking[0] == 0 and first.pvals_adj[0] < 1e-6  # 15 cells a side still find the planted gene
    assert np.array_equal(first.lfc, again.lfc) and not np.array_equal(first.lfc, other.lfc)
    assert not np.array_equal(first.lfc, de_test(lognorm, in_group, seed=0, rest=np.arange(200) < 150).lfc)
