"""`prepare`: h5ad / 10x .h5 / 10x Matrix Market / CSV -> a SOMA experiment read back equal; every refusal leaves
nothing."""

import gzip
import io
import logging
import os
import signal
import socket
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.io
import scipy.sparse as sp
import tiledbsoma
import tiledbsoma.io
from scldm_test_helpers import dead_pid

from scldm_scale.config import ConfigError
from scldm_scale.data.counts import DataError
from scldm_scale.data.prepare import TileDBWrites, prepare
from scldm_scale.data.soma import SomaSpec, read_anndata


def _read_back(uri: Path) -> ad.AnnData:
    return read_anndata(SomaSpec(str(uri)))


def _entries(folder: Path) -> list[str]:
    """Everything in a folder, hidden staging folders included."""
    return sorted(p.name for p in folder.iterdir())


# --- h5ad round trip -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, synthetic_h5ad) -> tuple[ad.AnnData, Path]:
    """The session's 120 cells x 50 genes (3 cell types of 40) ingested once with test 0.2 / val 0.1."""
    out = prepare(
        synthetic_h5ad,
        tmp_path_factory.mktemp("prepare") / "cells.soma",
        labels=["cell_type"],
        test_fraction=0.2,
        val_fraction=0.1,
        seed=3,
    )
    return ad.read_h5ad(synthetic_h5ad), out


def test_h5ad_round_trip_keeps_counts_labels_and_gene_ids(prepared):
    source, out = prepared
    back = _read_back(out)
    assert back.obs_names.tolist() == source.obs_names.tolist()
    np.testing.assert_array_equal(back.X.toarray(), source.X.toarray())
    np.testing.assert_array_equal(
        back.obs["cell_type"].to_numpy(dtype=str), source.obs["cell_type"].to_numpy(dtype=str)
    )
    assert back.var["feature_id"].tolist() == source.var_names.tolist()
    assert back.var["feature_name"].tolist() == source.var_names.tolist()  # no symbol column: the id


def test_h5ad_round_trip_n_counts_are_the_row_sums(prepared):
    source, out = prepared
    back = _read_back(out)
    np.testing.assert_array_equal(back.obs["n_counts"].to_numpy(), source.X.toarray().sum(axis=1))


def test_split_is_stratified_by_the_first_label(prepared):
    _, out = prepared
    obs = _read_back(out).obs
    assert set(obs["split"]) == {"train", "val", "test"}
    for cell_type, group in obs.groupby("cell_type", observed=True):
        # 40 cells of each type: round(0.2 * 40) = 8 test, round(0.1 * 40) = 4 val, the rest train.
        assert group["split"].value_counts().to_dict() == {"train": 28, "test": 8, "val": 4}, cell_type


def test_experiment_layout_is_rna_with_an_integer_counts_layer(prepared):
    _, out = prepared
    with tiledbsoma.Experiment.open(str(out)) as exp:
        assert list(exp.ms) == ["RNA"]
        assert list(exp.ms["RNA"].X) == ["counts"]
        assert exp.ms["RNA"].X["counts"].schema.field("soma_data").type == pa.int32()
    assert _entries(out.parent) == ["cells.soma"]  # the staging folder is gone


def test_a_layer_is_ingested_instead_of_x(counts_adata, tmp_path):
    source = counts_adata(n_cells=30, n_genes=10)
    source.layers["counts"] = source.X.copy()
    source.X = sp.csr_matrix(np.log1p(source.X.toarray()))  # not counts: would be refused as X
    source.write_h5ad(tmp_path / "cells.h5ad")
    back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma", layer="counts"))
    np.testing.assert_array_equal(back.X.toarray(), source.layers["counts"].toarray())


def test_near_integer_counts_are_stored_as_the_nearest_integer(tmp_path):
    # validate_counts accepts values within 1e-6 of an integer (float32 arithmetic leaves such values);
    # the stored count must then be that integer, not the value truncated towards zero.
    x = np.array([[3.0 - 1e-9, 1.0], [2.0, 5.0 - 1e-9]])  # (2, 2) float64
    source = ad.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["g0", "g1"]))
    source.write_h5ad(tmp_path / "cells.h5ad")
    back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma", test_fraction=0.0, val_fraction=0.0))
    np.testing.assert_array_equal(back.X.toarray(), [[3, 1], [2, 5]])
    np.testing.assert_array_equal(back.obs["n_counts"].to_numpy(), back.X.toarray().sum(axis=1))


# --- other input formats -------------------------------------------------------------------------------


def _gzip_text(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt") as f:
        f.write("".join(f"{line}\n" for line in lines))


def test_10x_matrix_market_folder_round_trip(counts_adata, tmp_path):
    source = counts_adata(n_cells=30, n_genes=12)
    counts = source.X.toarray().astype(np.int64)  # (N, G)
    antibody = np.full((counts.shape[0], 1), 7)  # (N, 1) a non-gene feature that must not be ingested
    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    buffer = io.BytesIO()
    scipy.io.mmwrite(buffer, sp.coo_matrix(np.hstack([counts, antibody]).T))  # 10x stores features x cells
    with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
        f.write(buffer.getvalue())
    features = [f"{g}\tSYM{j}\tGene Expression" for j, g in enumerate(source.var_names)]
    _gzip_text(folder / "features.tsv.gz", [*features, "CD3_TotalSeqB\tCD3\tAntibody Capture"])
    _gzip_text(folder / "barcodes.tsv.gz", source.obs_names.tolist())

    back = _read_back(prepare(folder, tmp_path / "cells.soma"))
    assert back.obs_names.tolist() == source.obs_names.tolist()
    np.testing.assert_array_equal(back.X.toarray(), counts)
    assert back.var["feature_id"].tolist() == source.var_names.tolist()
    assert back.var["feature_name"].tolist() == [f"SYM{j}" for j in range(12)]
    np.testing.assert_array_equal(back.obs["n_counts"].to_numpy(), counts.sum(axis=1))


def _write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], features: list[tuple[str, str, str]]) -> None:
    """A CellRanger v3+ feature-barcode .h5: matrix/ holds the features x cells matrix in CSC, i.e. the cells x
    features matrix in CSR, with features/{id, name, feature_type, genome}."""
    cells_by_features = sp.csr_matrix(counts)  # (N, F)
    with h5py.File(path, "w") as f:
        matrix = f.create_group("matrix")
        matrix["data"] = cells_by_features.data.astype(np.int32)
        matrix["indices"] = cells_by_features.indices.astype(np.int64)  # feature of each entry
        matrix["indptr"] = cells_by_features.indptr.astype(np.int64)  # per cell
        matrix["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)  # (F, N)
        matrix["barcodes"] = np.array(barcodes, dtype="S")
        group = matrix.create_group("features")
        for key, column in zip(("id", "name", "feature_type"), zip(*features, strict=True), strict=True):
            group[key] = np.array(column, dtype="S")
        group["genome"] = np.array(["GRCh38"] * len(features), dtype="S")
        group["_all_tag_keys"] = np.array([b"genome"])


def _gene_features(source: ad.AnnData) -> list[tuple[str, str, str]]:
    return [(g, f"SYM{j}", "Gene Expression") for j, g in enumerate(source.var_names)]


def test_10x_h5_round_trip(counts_adata, tmp_path):
    source = counts_adata(n_cells=30, n_genes=12)
    counts = source.X.toarray().astype(np.int64)  # (N, G)
    _write_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5", counts, source.obs_names.tolist(), _gene_features(source))

    back = _read_back(prepare(tmp_path / "filtered_feature_bc_matrix.h5", tmp_path / "cells.soma"))
    assert back.obs_names.tolist() == source.obs_names.tolist()
    np.testing.assert_array_equal(back.X.toarray(), counts)
    assert back.var["feature_id"].tolist() == source.var_names.tolist()
    assert back.var["feature_name"].tolist() == [f"SYM{j}" for j in range(12)]
    np.testing.assert_array_equal(back.obs["n_counts"].to_numpy(), counts.sum(axis=1))
    assert set(back.obs["split"]) <= {"train", "val", "test"}


def test_10x_h5_keeps_only_gene_expression_features(counts_adata, tmp_path, caplog):
    source = counts_adata(n_cells=30, n_genes=12)
    counts = source.X.toarray().astype(np.int64)  # (N, G)
    antibody = np.full((counts.shape[0], 2), 7)  # (N, 2) CITE-seq antibody counts: not genes
    features = [
        *_gene_features(source)[:5],
        ("CD3_TotalSeqB", "CD3", "Antibody Capture"),  # between genes, so dropping it must not shift columns
        *_gene_features(source)[5:],
        ("CD4_TotalSeqB", "CD4", "Antibody Capture"),
    ]
    with_antibodies = np.hstack([counts[:, :5], antibody[:, :1], counts[:, 5:], antibody[:, 1:]])  # (N, G + 2)
    _write_10x_h5(tmp_path / "cells.h5", with_antibodies, source.obs_names.tolist(), features)

    with caplog.at_level(logging.INFO, logger="scldm_scale.data.prepare"):
        back = _read_back(prepare(tmp_path / "cells.h5", tmp_path / "cells.soma"))
    assert "dropping 2 features that are not Gene Expression (2 Antibody Capture)" in caplog.text
    assert back.var["feature_id"].tolist() == source.var_names.tolist()
    np.testing.assert_array_equal(back.X.toarray(), counts)
    np.testing.assert_array_equal(back.obs["n_counts"].to_numpy(), counts.sum(axis=1))  # antibodies not counted


def test_cellranger_v2_h5_is_read(counts_adata, tmp_path):
    """CellRanger v2 wrote one group per genome with genes / gene_names instead of matrix/features."""
    source = counts_adata(n_cells=20, n_genes=8)
    counts = source.X.toarray().astype(np.int64)  # (N, G)
    cells_by_genes = sp.csr_matrix(counts)  # (N, G): the genes x cells CSC that 10x stores
    with h5py.File(tmp_path / "cells.h5", "w") as f:
        genome = f.create_group("GRCh38")
        genome["data"] = cells_by_genes.data.astype(np.int32)
        genome["indices"] = cells_by_genes.indices.astype(np.int64)
        genome["indptr"] = cells_by_genes.indptr.astype(np.int64)
        genome["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)  # (G, N)
        genome["barcodes"] = np.array(source.obs_names.tolist(), dtype="S")
        genome["genes"] = np.array(source.var_names.tolist(), dtype="S")
        genome["gene_names"] = np.array([f"SYM{j}" for j in range(8)], dtype="S")

    back = _read_back(prepare(tmp_path / "cells.h5", tmp_path / "cells.soma"))
    np.testing.assert_array_equal(back.X.toarray(), counts)
    assert back.var["feature_id"].tolist() == source.var_names.tolist()
    assert back.var["feature_name"].tolist() == [f"SYM{j}" for j in range(8)]


def _h5_without_matrix(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_group("obs")["index"] = np.array([b"cell_0"])
        f.create_group("var")["index"] = np.array([b"gene_0"])


def _h5_matrix_without_barcodes(path: Path) -> None:
    _write_10x_h5(path, np.eye(2, dtype=np.int64), ["cell_0", "cell_1"], [("g0", "G0", "Gene Expression")] * 2)
    with h5py.File(path, "a") as f:
        del f["matrix/barcodes"]


BAD_H5 = {
    "not_hdf5": (lambda path: path.write_text("barcode,gene_0\n"), "not an HDF5 file"),
    "empty_hdf5": (lambda path: h5py.File(path, "w").close(), "not a 10x .h5: no 'matrix' group .* entries are \\[\\]"),
    "no_matrix_group": (_h5_without_matrix, "not a 10x .h5: no 'matrix' group .* entries are \\['obs', 'var'\\]"),
    "matrix_without_barcodes": (_h5_matrix_without_barcodes, "cannot read as a 10x .h5: .*'barcodes'"),
}


@pytest.mark.parametrize("case", list(BAD_H5))
def test_an_h5_that_is_not_10x_is_refused_naming_the_file(tmp_path, case):
    write, message = BAD_H5[case]
    (tmp_path / "out").mkdir()
    write(tmp_path / "cells.h5")
    with pytest.raises(DataError, match=message) as raised:
        prepare(tmp_path / "cells.h5", tmp_path / "out" / "cells.soma")
    assert str(raised.value).startswith(str(tmp_path / "cells.h5"))
    assert _entries(tmp_path / "out") == []


@pytest.mark.parametrize("name", ["cells.csv", "cells.csv.gz"])
def test_csv_round_trip(counts_adata, tmp_path, name):
    source = counts_adata(n_cells=30, n_genes=12)
    frame = pd.DataFrame(source.X.toarray().astype(int), index=source.obs_names, columns=source.var_names)
    frame.to_csv(tmp_path / name)  # cells x genes, cell names in the first column; .gz compresses
    back = _read_back(prepare(tmp_path / name, tmp_path / "cells.soma"))
    assert back.obs_names.tolist() == source.obs_names.tolist()
    np.testing.assert_array_equal(back.X.toarray(), source.X.toarray())
    assert back.var["feature_id"].tolist() == source.var_names.tolist()
    assert set(back.obs["split"]) <= {"train", "val", "test"}


# --- refusals: an error naming the problem, and nothing at (or next to) the output URI -------------------


def _set_value(value: float):
    def mutate(adata: ad.AnnData) -> dict:
        x = adata.X.toarray()
        x[4, 2] = value
        adata.X = sp.csr_matrix(x)
        return {}

    return mutate


def _duplicate_gene(adata: ad.AnnData) -> dict:
    adata.var_names = ["gene_0", *adata.var_names[1:-1], "gene_0"]
    return {}


def _missing_labels(adata: ad.AnnData) -> dict:
    labels = adata.obs["cell_type"].astype(object)
    labels.iloc[[5, 9]] = np.nan
    adata.obs["cell_type"] = labels
    return {"labels": ["cell_type"]}


def _zero_cells(adata: ad.AnnData) -> dict:
    x = adata.X.toarray()
    x[[3, 7]] = 0
    adata.X = sp.csr_matrix(x)
    return {"zero_cells": "refuse"}


REFUSALS = {
    "non_integer": (_set_value(2.5), "1 non-integer values \\(first in cell 4\\)"),
    "negative": (_set_value(-1.0), "1 negative values .*first in cell 4"),
    "nan": (_set_value(np.nan), "1 NaN/inf values \\(first in cell 4\\)"),
    "inf": (_set_value(np.inf), "1 NaN/inf values \\(first in cell 4\\)"),
    "duplicate_gene_ids": (_duplicate_gene, "duplicate gene ids, e.g. \\['gene_0'\\]"),
    "missing_label": (lambda adata: {"labels": ["tissue"]}, "label columns \\['tissue'\\] are not in obs"),
    "zero_cells_refused": (_zero_cells, "2 cells have zero counts"),
    "missing_label_values": (_missing_labels, "label column 'cell_type' has 2 missing values \\(first: cell "),
    "missing_layer": (lambda adata: {"layer": "counts"}, "no layer 'counts'"),
    "unknown_zero_cells_choice": (lambda adata: {"zero_cells": "keep"}, "zero_cells must be 'drop' or 'refuse'"),
    "fractions_over_one": (lambda adata: {"test_fraction": 0.6, "val_fraction": 0.5}, "sum to less than 1"),
}


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_refused_and_nothing_is_written(counts_adata, tmp_path, case):
    mutate, message = REFUSALS[case]
    source = counts_adata(n_cells=30, n_genes=10)
    kwargs = mutate(source)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    source.write_h5ad(tmp_path / "in" / "cells.h5ad")
    with pytest.raises(DataError, match=message):
        prepare(tmp_path / "in" / "cells.h5ad", tmp_path / "out" / "cells.soma", **kwargs)
    assert _entries(tmp_path / "out") == []


def test_zero_count_cells_are_dropped_with_a_count(counts_adata, tmp_path, caplog):
    source = counts_adata(n_cells=30, n_genes=10)
    _zero_cells(source)
    source.write_h5ad(tmp_path / "cells.h5ad")
    with caplog.at_level(logging.WARNING, logger="scldm_scale.data.prepare"):
        back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma", labels=["cell_type"]))
    assert "dropping 2 cells with zero counts" in caplog.text
    kept = np.setdiff1d(np.arange(30), [3, 7])
    assert back.obs_names.tolist() == source.obs_names[kept].tolist()
    np.testing.assert_array_equal(back.X.toarray(), source.X.toarray()[kept])
    np.testing.assert_array_equal(
        back.obs["cell_type"].to_numpy(dtype=str), source.obs["cell_type"].to_numpy(str)[kept]
    )


def test_x_is_copied_in_row_chunks_across_dropped_cells(counts_adata, tmp_path, monkeypatch):
    """With 4-row chunks, 30 cells and two dropped ones, every chunk boundary and gap is exercised."""
    monkeypatch.setattr("scldm_scale.data.prepare.VALIDATE_CHUNK_ROWS", 4)
    source = counts_adata(n_cells=30, n_genes=10)
    _zero_cells(source)
    source.write_h5ad(tmp_path / "cells.h5ad")
    back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma", labels=["cell_type"]))
    kept = np.setdiff1d(np.arange(30), [3, 7])
    np.testing.assert_array_equal(back.X.toarray(), source.X.toarray()[kept])
    np.testing.assert_array_equal(back.obs["n_counts"].to_numpy(), source.X.toarray()[kept].sum(axis=1))


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(counts_adata, tmp_path):
    source = counts_adata(n_cells=30, n_genes=10)
    source.write_h5ad(tmp_path / "cells.h5ad")
    out = tmp_path / "cells.soma"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    with pytest.raises(ConfigError, match="already exists .*; choose another --out, pass --overwrite .*--append"):
        prepare(tmp_path / "cells.h5ad", out)
    assert _entries(out) == ["keep.txt"]
    assert _entries(tmp_path) == ["cells.h5ad", "cells.soma"]

    with pytest.raises(ConfigError, match="is not empty and is not a SOMA experiment .*choose another --out"):
        prepare(tmp_path / "cells.h5ad", out, overwrite=True)  # a folder of other files is never replaced
    assert _entries(out) == ["keep.txt"]

    (out / "keep.txt").unlink()
    prepare(tmp_path / "cells.h5ad", out)
    second = counts_adata(n_cells=30, n_genes=10, seed=3)
    second.write_h5ad(tmp_path / "second.h5ad")
    prepare(tmp_path / "second.h5ad", out, overwrite=True)
    np.testing.assert_array_equal(_read_back(out).X.toarray(), second.X.toarray())
    assert _entries(tmp_path) == ["cells.h5ad", "cells.soma", "second.h5ad"]


def _interrupted_ingestion(monkeypatch) -> list[str]:
    """Make from_anndata write part of an experiment, then fail; return the URIs it was given."""
    given: list[str] = []

    def half_write(uri, *args, **kwargs):
        given.append(uri)
        Path(uri, "ms").mkdir(parents=True)
        Path(uri, "ms", "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(tiledbsoma.io, "from_anndata", half_write)
    return given


def test_interrupted_ingestion_leaves_nothing_at_the_uri(counts_adata, tmp_path, monkeypatch):
    counts_adata(n_cells=30, n_genes=10).write_h5ad(tmp_path / "cells.h5ad")
    given = _interrupted_ingestion(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma")
    assert len(given) == 1 and not Path(given[0]).exists()
    assert _entries(tmp_path) == ["cells.h5ad"]


def test_interrupted_ingestion_into_new_folders_leaves_no_empty_folder(counts_adata, tmp_path, monkeypatch):
    counts_adata(n_cells=30, n_genes=10).write_h5ad(tmp_path / "cells.h5ad")
    _interrupted_ingestion(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        prepare(tmp_path / "cells.h5ad", tmp_path / "new" / "deeper" / "cells.soma")
    assert _entries(tmp_path) == ["cells.h5ad"]


def test_ctrl_c_during_ingestion_removes_the_partial(counts_adata, tmp_path, monkeypatch):
    counts_adata(n_cells=30, n_genes=10).write_h5ad(tmp_path / "cells.h5ad")

    def interrupted(uri, *args, **kwargs):
        Path(uri).mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(tiledbsoma.io, "from_anndata", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma")
    assert _entries(tmp_path) == ["cells.h5ad"]


def test_a_killed_ingestion_leaves_a_partial_that_the_next_prepare_removes(counts_adata, tmp_path, caplog):
    source = counts_adata(n_cells=30, n_genes=10)
    source.write_h5ad(tmp_path / "cells.h5ad")
    stale = tmp_path / ".cells.soma.abc123.partial"  # as a kill -9 leaves it: the owner process is gone
    (stale / "cells.soma").mkdir(parents=True)
    (stale / "owner").write_text(f"{socket.gethostname()} {dead_pid()}\n")
    with caplog.at_level("WARNING"):
        prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma")
    assert _entries(tmp_path) == ["cells.h5ad", "cells.soma"]
    assert "left unfinished by an interrupted run" in caplog.text
    np.testing.assert_array_equal(_read_back(tmp_path / "cells.soma").X.toarray(), source.X.toarray())


def test_an_unwritable_out_is_refused_before_the_input_is_read(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="a_file is a file, not a folder; choose another --out"):
        prepare(tmp_path / "missing.h5ad", tmp_path / "a_file" / "cells.soma")
    assert _entries(tmp_path) == ["a_file"]


def test_a_damaged_h5ad_is_refused_with_the_fix(counts_adata, tmp_path):
    counts_adata(n_cells=30, n_genes=10).write_h5ad(tmp_path / "cells.h5ad")
    whole = (tmp_path / "cells.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="cut.h5ad: cannot read as an .h5ad .*truncated.*copy it again"):
        prepare(tmp_path / "cut.h5ad", tmp_path / "cells.soma")
    assert not (tmp_path / "cells.soma").exists()


def test_interrupted_overwrite_keeps_the_previous_experiment(counts_adata, tmp_path, monkeypatch):
    first = counts_adata(n_cells=30, n_genes=10, seed=1)
    first.write_h5ad(tmp_path / "first.h5ad")
    counts_adata(n_cells=30, n_genes=10, seed=2).write_h5ad(tmp_path / "second.h5ad")
    out = prepare(tmp_path / "first.h5ad", tmp_path / "cells.soma")
    _interrupted_ingestion(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        prepare(tmp_path / "second.h5ad", out, overwrite=True)
    np.testing.assert_array_equal(_read_back(out).X.toarray(), first.X.toarray())
    assert _entries(tmp_path) == ["cells.soma", "first.h5ad", "second.h5ad"]


# --- appending ------------------------------------------------------------------------------------------


def test_append_adds_cells_and_extends_the_vocabulary_with_new_genes_last(counts_adata, tmp_path):
    first = counts_adata(n_cells=20, n_genes=8)
    second = counts_adata(n_cells=15, n_genes=8)
    second.obs_names = [f"second_{i}" for i in range(15)]
    # The second dataset has genes 3..7 of the first, in another order, plus two new genes.
    second.var_names = [f"gene_{i}" for i in (7, 5, 3, 4, 6)] + ["new_a", "new_b"] + ["gene_extra"]
    first.write_h5ad(tmp_path / "first.h5ad")
    second.write_h5ad(tmp_path / "second.h5ad")
    uri = prepare(tmp_path / "first.h5ad", tmp_path / "cells.soma", labels=["cell_type"])
    prepare(tmp_path / "second.h5ad", uri, labels=["cell_type"], append=True)
    back = _read_back(uri)
    new_genes = ["new_a", "new_b", "gene_extra"]
    assert back.var["feature_id"].tolist() == first.var_names.tolist() + new_genes
    assert back.obs_names.tolist() == first.obs_names.tolist() + second.obs_names.tolist()
    dense = back.X.toarray()
    np.testing.assert_array_equal(dense[:20, :8], first.X.toarray())
    assert not dense[:20, 8:].any()
    column = {g: i for i, g in enumerate(back.var["feature_id"])}
    np.testing.assert_array_equal(dense[20:][:, [column[g] for g in second.var_names]], second.X.toarray())
    np.testing.assert_array_equal(back.obs["n_counts"].to_numpy(), dense.sum(axis=1))
    assert _entries(tmp_path) == sorted(["first.h5ad", "second.h5ad", "cells.soma"])


def test_append_refuses_other_labels_duplicate_cells_and_a_missing_experiment(counts_adata, tmp_path):
    source = counts_adata(n_cells=20, n_genes=8)
    source.write_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(DataError, match="no experiment to append to"):
        prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma", labels=["cell_type"], append=True)
    uri = prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma", labels=["cell_type"])
    before = _read_back(uri).X.toarray()
    with pytest.raises(DataError, match="same \\(--labels\\)"):
        prepare(tmp_path / "cells.h5ad", uri, labels=[], append=True)
    with pytest.raises(DataError, match="cannot append"):
        prepare(tmp_path / "cells.h5ad", uri, labels=["cell_type"], append=True)  # the same cell ids again
    np.testing.assert_array_equal(_read_back(uri).X.toarray(), before)
    assert _entries(tmp_path) == ["cells.h5ad", "cells.soma"]


# --- gene schema, raw-count detection, gene selection ---------------------------------------------------


def _ensembl(n: int) -> list[str]:
    return [f"ENSG{j:011d}" for j in range(n)]


def test_ensembl_ids_in_a_column_become_feature_id_and_symbol_var_names_feature_name(counts_adata, tmp_path):
    """scanpy's read_10x_* default: symbols as var_names, Ensembl ids in var['gene_ids']."""
    source = counts_adata(n_cells=30, n_genes=10)
    source.var["gene_ids"] = _ensembl(10)
    source.var_names = [f"SYM{j}" for j in range(10)]
    source.write_h5ad(tmp_path / "cells.h5ad")
    back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma"))
    assert back.var["feature_id"].tolist() == _ensembl(10)
    assert back.var["feature_name"].tolist() == [f"SYM{j}" for j in range(10)]


def test_ensembl_var_names_win_over_a_column_and_flags_name_the_columns(counts_adata, tmp_path):
    source = counts_adata(n_cells=30, n_genes=10)
    source.var_names = _ensembl(10)
    source.var["gene_id"] = [f"other{j}" for j in range(10)]
    source.var["gene_symbols"] = [f"SYM{j}" for j in range(10)]
    source.var["symbol"] = [f"ALT{j}" for j in range(10)]
    source.write_h5ad(tmp_path / "cells.h5ad")
    back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "a.soma"))
    assert back.var["feature_id"].tolist() == _ensembl(10)
    assert back.var["feature_name"].tolist() == [f"SYM{j}" for j in range(10)]
    named = prepare(tmp_path / "cells.h5ad", tmp_path / "b.soma", gene_id_column="gene_id", gene_name_column="symbol")
    back = _read_back(named)
    assert back.var["feature_id"].tolist() == [f"other{j}" for j in range(10)]
    assert back.var["feature_name"].tolist() == [f"ALT{j}" for j in range(10)]
    with pytest.raises(DataError, match="--gene-id-column 'nope' is not a var column"):
        prepare(tmp_path / "cells.h5ad", tmp_path / "c.soma", gene_id_column="nope")


def _log_normalised(adata: ad.AnnData) -> sp.csr_matrix:
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    x = sp.diags(1e4 / np.asarray(x.sum(axis=1)).ravel()) @ x
    return sp.csr_matrix(x).log1p().astype(np.float32)


def test_counts_are_found_in_a_counts_layer_when_x_is_log_normalised(counts_adata, tmp_path, caplog):
    source = counts_adata(n_cells=30, n_genes=10)
    counts = source.X.copy()
    source.layers["counts"] = counts
    source.X = _log_normalised(source)
    source.write_h5ad(tmp_path / "cells.h5ad")
    with caplog.at_level(logging.INFO, logger="scldm_scale.data.prepare"):
        back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma"))
    assert "raw counts from layers['counts'] (X has" in caplog.text
    np.testing.assert_array_equal(back.X.toarray(), counts.toarray())


def test_counts_are_found_in_raw_x_with_raw_var_genes(counts_adata, tmp_path, caplog):
    """The usual processed file: X log-normalised over a gene subset, .raw the counts of every gene."""
    source = counts_adata(n_cells=30, n_genes=10)
    source.var["gene_symbols"] = [f"SYM{j}" for j in range(10)]
    source.raw = source
    subset = source[:, 2:6].copy()
    subset.X = _log_normalised(subset)
    subset.write_h5ad(tmp_path / "cells.h5ad")
    with caplog.at_level(logging.INFO, logger="scldm_scale.data.prepare"):
        back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "cells.soma"))
    assert "raw counts from raw.X" in caplog.text
    np.testing.assert_array_equal(back.X.toarray(), source.X.toarray())
    assert back.var["feature_id"].tolist() == source.var_names.tolist()
    assert back.var["feature_name"].tolist() == [f"SYM{j}" for j in range(10)]
    explicit = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "explicit.soma", layer="raw.X"))
    np.testing.assert_array_equal(explicit.X.toarray(), source.X.toarray())


def test_no_counts_anywhere_lists_where_it_looked_and_the_flags(counts_adata, tmp_path):
    source = counts_adata(n_cells=30, n_genes=10)
    source.layers["scaled"] = _log_normalised(source)
    source.X = _log_normalised(source)
    source.write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError) as err:
        prepare(tmp_path / "cells.h5ad", tmp_path / "out" / "cells.soma")
    message = str(err.value)
    assert (
        "found no raw integer counts; looked at X, layers ['counts', 'raw_counts', 'umi_counts'] and .raw.X" in message
    )
    assert "X has" in message and "non-integer values (first in cell 0)" in message
    assert "layers are ['scaled'] (['scaled'] not tried)" in message
    assert "--layer NAME" in message and "--allow-non-integer" in message
    assert _entries(tmp_path / "out") == []


def test_hvg_keeps_scanpys_seurat_v3_genes_on_a_subsample(counts_adata, tmp_path, monkeypatch, caplog):
    import scanpy as sc

    from scldm_scale.data.genes import hvg_rows

    source = counts_adata(n_cells=120, n_genes=50)
    source.write_h5ad(tmp_path / "cells.h5ad")

    def reference(rows):
        table = sc.pp.highly_variable_genes(
            ad.AnnData(X=source.X[rows].copy()), flavor="seurat_v3", n_top_genes=8, inplace=False
        )
        return source.var_names[table["highly_variable"].to_numpy()].tolist()

    back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "all.soma", genes="hvg:8"))
    assert back.var["feature_id"].tolist() == reference(np.arange(120))
    kept = source[:, back.var["feature_id"].tolist()].X.toarray()
    np.testing.assert_array_equal(back.X.toarray(), kept)
    np.testing.assert_array_equal(back.obs["n_counts"].to_numpy(), kept.sum(axis=1))  # totals over the kept genes

    monkeypatch.setattr("scldm_scale.data.genes.HVG_MAX_CELLS", 50)
    monkeypatch.setattr("scldm_scale.data.prepare.VALIDATE_CHUNK_ROWS", 16)  # the subsample spans chunks
    with caplog.at_level(logging.INFO, logger="scldm_scale.data.genes"):
        back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "sub.soma", genes="hvg:8", seed=5))
    assert "on 50 of 120 cells (seed 5)" in caplog.text
    assert back.var["feature_id"].tolist() == reference(hvg_rows(120, 5))


def test_a_gene_file_keeps_its_genes_by_id_or_by_name_in_data_order(counts_adata, tmp_path, caplog):
    source = counts_adata(n_cells=30, n_genes=10)
    source.var["gene_symbols"] = [f"SYM{j}" for j in range(10)]
    source.write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "ids.txt").write_text("# genes\ngene_7\ngene_2\n\ngene_99\n")
    with caplog.at_level(logging.WARNING, logger="scldm_scale.data.genes"):
        back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "ids.soma", genes=str(tmp_path / "ids.txt")))
    assert back.var["feature_id"].tolist() == ["gene_2", "gene_7"]
    assert "1 of the 3 genes listed" in caplog.text
    kept = source[:, ["gene_2", "gene_7"]].X.toarray()
    kept = kept[kept.sum(axis=1) > 0]  # cells without counts over the kept genes are dropped
    np.testing.assert_array_equal(back.X.toarray(), kept)
    (tmp_path / "names.txt").write_text("SYM4\nSYM1\n")
    back = _read_back(prepare(tmp_path / "cells.h5ad", tmp_path / "names.soma", genes=str(tmp_path / "names.txt")))
    assert back.var["feature_name"].tolist() == ["SYM1", "SYM4"]
    with pytest.raises(DataError, match="neither all, hvg:N nor an existing file"):
        prepare(tmp_path / "cells.h5ad", tmp_path / "bad.soma", genes="hvg")


def test_cli_flags_choose_the_counts_genes_and_gene_columns(counts_adata, tmp_path, capsys):
    from scldm_scale.cli import main

    source = counts_adata(n_cells=30, n_genes=40)
    source.layers["umis"] = source.X.copy()
    source.X = _log_normalised(source)
    source.var["symbol"] = [f"SYM{j}" for j in range(40)]
    source.write_h5ad(tmp_path / "cells.h5ad")
    argv = ["prepare", str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "cells.soma"), "--layer", "umis"]
    argv += ["--genes", "hvg:4", "--gene-id-column", "index", "--gene-name-column", "symbol"]
    assert main(argv) == 0
    back = _read_back(tmp_path / "cells.soma")
    assert back.n_vars == 4 and back.var["feature_name"].str.startswith("SYM").all()
    assert main(["prepare", str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "none.soma")]) == 2
    assert "(['umis'] not tried). Pass --layer NAME" in capsys.readouterr().err


def test_ctrl_c_while_tiledb_writes_is_raised_between_chunks():
    # pytest may run with SIGINT ignored (a background CI job): give the test the interactive default.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with TileDBWrites() as interrupt:
                os.kill(os.getpid(), signal.SIGINT)  # recorded, not raised inside the (native) write
                interrupt.check()
        with pytest.raises(KeyboardInterrupt):
            with TileDBWrites():
                raise RuntimeError("[TileDB::Query] Error: Query cancelled.")  # TileDB's own SIGINT handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # started under nohup: SIGINT stays ignored
        with TileDBWrites() as interrupt:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            interrupt.check()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def test_unreadable_csv_and_matrix_market_inputs_are_refused_with_the_expected_layout(tmp_path):
    (tmp_path / "cells.csv").write_text("cell,g1,g2\nc1,1,2\nc2,x,3\n")
    with pytest.raises(DataError, match=r"cells.csv: cannot read as a cells x genes CSV .*'x'.*the first column"):
        prepare(tmp_path / "cells.csv", tmp_path / "out.soma")
    (tmp_path / "mtx").mkdir()
    (tmp_path / "mtx" / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n3 2 1\n1 1 5\n")
    with pytest.raises(DataError, match="mtx: cannot read as a 10x Matrix Market folder .*genes.tsv"):
        prepare(tmp_path / "mtx", tmp_path / "out.soma")
    assert _entries(tmp_path) == ["cells.csv", "mtx"]
