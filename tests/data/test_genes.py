"""Gene selection (`data.genes`, `prepare --genes`): all, hvg:N by scanpy's seurat_v3 on raw counts, or a file."""

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from scldm_scale.config import DataConfig
from scldm_scale.data.counts import DataError
from scldm_scale.data.genes import GeneSelection, hvg_rows
from scldm_scale.data.source import open_train_cells


def _seurat_v3(counts: np.ndarray, n_top: int) -> np.ndarray:
    table = sc.pp.highly_variable_genes(
        ad.AnnData(X=sp.csr_matrix(counts)), flavor="seurat_v3", n_top_genes=n_top, inplace=False
    )
    return np.flatnonzero(table["highly_variable"].to_numpy())


def test_selection_text_is_parsed_or_refused(tmp_path):
    assert GeneSelection.parse("all") == GeneSelection("all")
    assert GeneSelection.parse("hvg:2000") == GeneSelection("hvg", n_top=2000)
    (tmp_path / "genes.txt").write_text("A\n")
    assert GeneSelection.parse(str(tmp_path / "genes.txt")) == GeneSelection("file", path=str(tmp_path / "genes.txt"))
    for bad in ("hvg:0", "hvg:x", "hvg", str(tmp_path / "absent.txt")):
        with pytest.raises(DataError, match=f"genes={bad!r}"):
            GeneSelection.parse(bad)


def test_hvg_rows_are_all_cells_or_a_seeded_uniform_subsample(monkeypatch):
    np.testing.assert_array_equal(hvg_rows(30, 0), np.arange(30))
    monkeypatch.setattr("scldm_scale.data.genes.HVG_MAX_CELLS", 10)
    rows = hvg_rows(30, 4)
    assert len(rows) == 10 and len(np.unique(rows)) == 10 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, hvg_rows(30, 4))


def test_soma_training_keeps_the_hvgs_of_the_train_cells(soma_experiment):
    exp = soma_experiment
    cfg = DataConfig(source="soma", uri=exp.uri, condition_keys=["cell_type"], genes="hvg:12")
    cells = open_train_cells(cfg, batch_size=16, seed=0)
    train = exp.counts[exp.split == "train"]
    expected = _seurat_v3(train, 12)
    assert cells.vocabulary.ids == [exp.gene_ids[j] for j in expected]
    assert cells.vocabulary.names == cells.vocabulary.ids  # feature_name carried along
    # The library sizes are over the kept genes, and so are the batches' columns.
    np.testing.assert_array_equal(cells.library_sizes, train[:, expected].sum(axis=1))
    batch = next(iter(cells.ordered()))
    np.testing.assert_array_equal(batch.target.numpy(), train[: len(batch.target)][:, expected])


def test_h5ad_training_keeps_the_genes_a_file_lists(synthetic_h5ad, tmp_path):
    (tmp_path / "genes.txt").write_text("gene_40\ngene_4\ngene_404\n")
    cfg = DataConfig(
        source="h5ad", path=str(synthetic_h5ad), condition_keys=["cell_type"], genes=str(tmp_path / "genes.txt")
    )
    cells = open_train_cells(cfg, batch_size=16, seed=0)
    assert cells.vocabulary.ids == ["gene_4", "gene_40"]  # the data's order; gene_404 is not in the data
    kept = ad.read_h5ad(synthetic_h5ad)[:, ["gene_4", "gene_40"]].X.toarray()
    # Cells without counts over the kept genes are dropped; the train cells' library sizes are over the kept genes.
    assert set(cells.library_sizes) <= set(kept.sum(axis=1)) and (cells.library_sizes > 0).all()


def test_hvg_on_too_few_genes_is_a_data_error(counts_adata):
    from scldm_scale.data.genes import highly_variable

    with pytest.raises(DataError, match=r"hvg:4: seurat_v3 cannot fit its mean-variance trend on 30 cells x 10 genes"):
        highly_variable(counts_adata(n_cells=30, n_genes=10).X, 4)
