"""`synthetic_perturbation`: integer NB counts, determinism, the planted effects visible in the counts, the
shared component carried across cell lines, and the `synthetic_perturbation` built-in; `synthetic_transcriptome`
and `scldm-scale synthetic`: a whole-transcriptome sample's ids, sparsity, library sizes and cell types."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scldm_scale.data.counts import load_builtin
from scldm_scale.data.synthetic import synthetic_perturbation, synthetic_transcriptome


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return synthetic_perturbation()


def _observed_log_ratio(adata: ad.AnnData, line: str, perturbation: str) -> np.ndarray:
    """(G,) log of the mean expression share of the (line, perturbation) cells over that of the line's control."""

    def mean_share(p: str) -> np.ndarray:
        rows = ((adata.obs["cell_line"] == line) & (adata.obs["perturbation"] == p)).to_numpy()
        x = adata.X[rows].toarray().astype(np.float64)
        return (x / x.sum(axis=1, keepdims=True)).mean(axis=0)

    return np.log((mean_share(perturbation) + 1e-4) / (mean_share("control") + 1e-4))


def test_counts_labels_and_genes_have_the_documented_form(adata):
    truth = adata.uns["synthetic_truth"]
    assert adata.shape == (3 * 4 * 100, 400)
    assert sp.isspmatrix_csr(adata.X) and np.issubdtype(adata.X.dtype, np.integer)
    assert adata.X.data.min() > 0  # stored entries are the non-zero counts
    assert (np.diff(adata.X.indptr) > 0).all()  # no empty cell
    assert 0.05 < adata.X.nnz / np.prod(adata.shape) < 0.25
    assert adata.obs["cell_line"].cat.categories.tolist() == ["line_A", "line_B", "line_C"]
    assert adata.obs["perturbation"].cat.categories.tolist() == ["control", "pert_1", "pert_2", "pert_3"]
    assert adata.obs.groupby(["cell_line", "perturbation"], observed=True).size().eq(100).all()
    assert adata.var_names[0] == "GENE00001" and adata.var_names.is_unique
    assert adata.var["feature_name"].iloc[0] == "SYN1"
    assert truth["log_fold_change"].shape == (3, 4, 400)
    assert not truth["log_fold_change"][:, 0].any()  # the control has no effect
    # Sparse effects: 5% of the genes per perturbation, the same genes in every line.
    affected = truth["log_fold_change"] != 0
    assert (affected[:, 1:].sum(axis=-1) == 20).all()
    assert (affected == affected[:1]).all()


def test_a_seed_gives_the_same_data_and_another_seed_other_data():
    a, b, c = (synthetic_perturbation(n_cells_per_group=5, n_genes=60, seed=s) for s in (3, 3, 4))
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(
        a.uns["synthetic_truth"]["log_fold_change"], b.uns["synthetic_truth"]["log_fold_change"]
    )
    assert a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0


def test_planted_effects_show_in_every_line(adata):
    truth = adata.uns["synthetic_truth"]
    for i, line in enumerate(truth["cell_lines"]):
        for j, perturbation in enumerate(truth["perturbations"][1:], start=1):
            planted = truth["log_fold_change"][i, j]
            affected = planted != 0
            observed = _observed_log_ratio(adata, line, perturbation)
            assert np.corrcoef(observed[affected], planted[affected])[0, 1] > 0.8, (line, perturbation)
            # Unaffected genes move only by noise and renormalisation: far less than the effects.
            assert np.abs(observed[~affected]).mean() < 0.5 * np.abs(observed[affected]).mean()


def test_the_shared_component_carries_across_lines(adata):
    truth = adata.uns["synthetic_truth"]
    for j, perturbation in enumerate(truth["perturbations"][1:], start=1):
        shared = truth["shared_log_fold_change"][j]
        affected = shared != 0
        for line in truth["cell_lines"]:
            observed = _observed_log_ratio(adata, line, perturbation)
            assert np.corrcoef(observed[affected], shared[affected])[0, 1] > 0.5, (line, perturbation)


@pytest.mark.parametrize("shared_fraction", [0.0, 0.7, 1.0])
def test_effects_of_two_lines_correlate_by_the_shared_fraction(shared_fraction):
    # Many perturbations, one cell each: the effects are drawn before the cells, so they need no cells.
    truth = synthetic_perturbation(
        n_perturbations=40, n_cells_per_group=1, shared_fraction=shared_fraction, seed=1
    ).uns["synthetic_truth"]
    effects = truth["log_fold_change"][:, 1:]  # (C, P, G)
    affected = effects[0] != 0
    r = np.corrcoef(effects[0][affected], effects[1][affected])[0, 1]  # 800 gene-perturbation pairs
    assert abs(r - shared_fraction) < 0.1


def test_builtin_is_the_default_synthetic_data_and_survives_h5ad(tmp_path, adata):
    builtin = load_builtin("synthetic_perturbation")
    assert (builtin.X != adata.X).nnz == 0 and builtin.obs.equals(adata.obs)
    builtin.write_h5ad(tmp_path / "synthetic.h5ad")
    back = ad.read_h5ad(tmp_path / "synthetic.h5ad")
    assert (back.X != adata.X).nnz == 0
    np.testing.assert_array_equal(
        back.uns["synthetic_truth"]["log_fold_change"], adata.uns["synthetic_truth"]["log_fold_change"]
    )


def test_synthetic_transcriptome_looks_like_a_whole_transcriptome_sample():
    adata = synthetic_transcriptome(n_cells=60, n_genes=33_000, seed=1)
    assert adata.shape == (60, 33_000)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.int32
    assert 0.01 <= adata.X.nnz / np.prod(adata.shape) <= 0.03
    library = np.asarray(adata.X.sum(axis=1)).ravel()
    assert library.min() >= 500 and library.max() <= 25_000 and 1_500 <= np.median(library) <= 6_000
    assert adata.var_names[0] == "ENSG00000000001" and adata.var_names.is_unique
    assert adata.var["feature_name"].iloc[-1] == "SYN33000"
    assert adata.obs["cell_type"].cat.categories.tolist() == [f"type_{t}" for t in range(6)]
    assert adata.obs["donor"].cat.categories.tolist() == ["donor_0", "donor_1", "donor_2"]
    again = synthetic_transcriptome(n_cells=60, n_genes=33_000, seed=1)
    assert (adata.X != again.X).nnz == 0


def test_synthetic_transcriptome_cell_types_differ_in_their_markers():
    adata = synthetic_transcriptome(n_cells=400, n_genes=2_000, n_cell_types=2, n_donors=1, seed=2)
    x = adata.X.toarray().astype(np.float64)
    share = x / x.sum(axis=1, keepdims=True)
    first = (adata.obs["cell_type"] == "type_0").to_numpy()
    log_ratio = np.log((share[first].mean(0) + 1e-5) / (share[~first].mean(0) + 1e-5))  # (G,)
    # 5% of the genes of each type are shifted by N(0, 1.5²): some genes differ more than 4-fold.
    assert (np.abs(log_ratio) > np.log(4)).sum() > 20


def test_cli_synthetic_writes_the_h5ad(tmp_path, capsys):
    from scldm_scale.cli import main

    out = tmp_path / "cells.h5ad"
    assert main(["synthetic", "--out", str(out), "--cells", "30", "--genes", "500", "--seed", "4"]) == 0
    assert "wrote 30 cells x 500 genes" in capsys.readouterr().out
    assert (ad.read_h5ad(out).X != synthetic_transcriptome(30, 500, seed=4).X).nnz == 0


def test_cli_synthetic_library_and_marker_options_reach_the_generator(tmp_path):
    from scldm_scale.cli import main

    out = tmp_path / "cells.h5ad"
    args = ["--cells", "40", "--genes", "500", "--seed", "4", "--median-library", "1500", "--marker-sd", "2.0"]
    assert main(["synthetic", "--out", str(out), *args]) == 0
    expected = synthetic_transcriptome(40, 500, seed=4, median_library_size=1500.0, marker_sd=2.0)
    assert (ad.read_h5ad(out).X != expected.X).nnz == 0
    assert (expected.X != synthetic_transcriptome(40, 500, seed=4).X).nnz > 0
    assert main(["synthetic", "--out", str(tmp_path / "x.h5ad"), "--median-library", "0"]) == 2
