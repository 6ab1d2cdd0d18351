"""`scldm-scale synthetic-census`: a tiny Census-shaped experiment written in blocks, then read through the
`census` data source (cellxgene_census.open_soma on the local collection)."""

import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma

import scldm_scale.data.census as census
from scldm_scale.cli import main
from scldm_scale.config import DataConfig
from scldm_scale.data.counts import DataError
from scldm_scale.data.source import open_train_cells

N_CELLS, N_GENES, N_DATASETS = 230, 400, 3


@pytest.fixture
def small_census(tmp_path, monkeypatch):
    # Blocks smaller than the experiment, so the writer's block loop and per-block obs/var sums are exercised.
    monkeypatch.setattr(census, "ROWS_PER_WRITE", 100)
    monkeypatch.setattr(census, "ROWS_PER_DRAW", 30)
    root = tmp_path / "census"
    args = ["--out", str(root), "--cells", str(N_CELLS), "--genes", str(N_GENES), "--datasets", str(N_DATASETS)]
    assert main(["synthetic-census", *args, "--median-library", "300", "--seed", "3"]) == 0
    return root


def expected_counts(seed: int = 3) -> sp.csr_matrix:
    """The counts as draw_counts gives them, cell block by cell block as the writer draws them."""
    design = census.census_design(N_CELLS, N_GENES, N_DATASETS, 300.0, seed)
    blocks = []
    for start in range(0, N_CELLS, 100):
        stop = min(start + 100, N_CELLS)
        for sub in range(start, stop, 30):
            rows, genes, counts = census.draw_counts(design, sub, min(sub + 30, stop), seed)
            blocks.append(sp.csr_matrix((counts, (rows, genes)), shape=(min(sub + 30, stop) - sub, N_GENES)))
    return sp.vstack(blocks).tocsr()


def test_synthetic_census_has_the_census_layout(small_census):
    with tiledbsoma.Collection.open(str(small_census)) as root:
        assert set(root) == {"census_info", "census_data"}
        summary = root["census_info"]["summary"].read().concat().to_pandas()
        assert dict(zip(summary["label"], summary["value"], strict=True))["total_cell_count"] == str(N_CELLS)
        datasets = root["census_info"]["datasets"].read().concat().to_pandas()
        exp = root["census_data"]["homo_sapiens"]
        assert list(exp.ms["RNA"].X) == ["raw"]
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        obs = exp.obs.read().concat().to_pandas()
    assert var["feature_id"].tolist() == census.gene_ids(N_GENES) and var["feature_id"][0] == "ENSG00000000001"
    assert var["feature_name"].is_unique
    # Datasets are contiguous blocks of soma_joinids, counted in census_info.
    assert obs["dataset_id"].nunique() == N_DATASETS
    first = obs.groupby("dataset_id")["soma_joinid"].agg(["min", "max", "count"])
    assert ((first["max"] - first["min"] + 1) == first["count"]).all()
    assert (
        dict(zip(datasets["dataset_id"], datasets["dataset_total_cell_count"], strict=True)) == first["count"].to_dict()
    )
    counts = expected_counts()
    np.testing.assert_array_equal(obs["raw_sum"], counts.sum(axis=1).A1)
    np.testing.assert_array_equal(obs["nnz"], counts.getnnz(axis=1))
    np.testing.assert_array_equal(var["nnz"], counts.getnnz(axis=0))


def test_synthetic_census_reads_through_the_census_source(small_census):
    cfg = DataConfig(
        source="census", uri=str(small_census), condition_keys=["cell_type"], obs_filter="is_primary_data == True"
    )
    cells = open_train_cells(cfg, batch_size=16, seed=0)
    assert cells.n_cells == N_CELLS and cells.gene_names == census.gene_ids(N_GENES)
    read = np.concatenate([batch.target.numpy() for batch in cells.ordered()])  # (N, G), soma_joinid order
    counts = expected_counts()
    np.testing.assert_array_equal(read, counts.toarray())
    np.testing.assert_array_equal(cells.library_sizes, counts.sum(axis=1).A1)
    assert set(cells.labels["cell_type"]) <= {name for name, _ in census.CELL_TYPES}


def test_synthetic_census_refuses_an_existing_folder(small_census):
    with pytest.raises(DataError, match="exists; pass a new --out folder"):
        census.write_synthetic_census(small_census, 10, 10, n_datasets=2)
