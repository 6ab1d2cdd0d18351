"""Raw-count validation, the built-in PBMC dataset's count recovery, and reading .h5ad files."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scldm_scale.data.counts import DataError, load_builtin, read_counts, validate_counts


def _csr_with(value: float, row: int, n_rows: int = 5, n_cols: int = 4) -> sp.csr_matrix:
    dense = np.arange(n_rows * n_cols, dtype=np.float32).reshape(n_rows, n_cols) % 3
    dense[row, 2] = value
    dense[row, 3] = value
    return sp.csr_matrix(dense)


def test_valid_counts_pass():
    validate_counts(sp.csr_matrix(np.array([[0, 1, 2], [5, 0, 0]], dtype=np.float32)), "x")
    validate_counts(np.array([[0.0, 3.0]]), "x")
    validate_counts(sp.csr_matrix((3, 4), dtype=np.float32), "x")  # all zeros


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("sparse", [True, False])
def test_nan_and_inf_are_rejected_with_their_count(value, sparse):
    x = _csr_with(value, row=3)
    with pytest.raises(DataError, match=r"mydata: 2 NaN/inf values"):
        validate_counts(x if sparse else x.toarray(), "mydata")


@pytest.mark.parametrize("sparse", [True, False])
def test_negative_values_are_rejected_with_count_and_minimum(sparse):
    x = _csr_with(-2.0, row=1)
    with pytest.raises(DataError, match=r"mydata: 2 negative values \(min -2\.0"):
        validate_counts(x if sparse else x.toarray(), "mydata")


@pytest.mark.parametrize("value", [np.nan, -2.0])
def test_nan_and_negative_errors_name_the_first_bad_cell(value):
    # validate_counts' docstring promises "naming the first bad cell" for every rejection, as the
    # non-integer message does; a user with 100k cells needs to know where to look.
    with pytest.raises(DataError, match="first in cell 3"):
        validate_counts(_csr_with(value, row=3), "mydata")


@pytest.mark.parametrize("row", [0, 3, 4])
@pytest.mark.parametrize("sparse", [True, False])
def test_non_integer_names_count_and_first_cell(row, sparse):
    x = _csr_with(0.5, row=row)
    with pytest.raises(DataError) as err:
        validate_counts(x if sparse else x.toarray(), "mydata")
    message = str(err.value)
    assert "mydata: 2 non-integer values" in message
    assert f"first in cell {row}" in message
    assert "data.layer" in message and "data.allow_non_integer" in message


def test_first_cell_is_right_after_empty_rows():
    # Rows 0-2 store nothing, so the CSR data index of the bad value is 0 but its cell is 3.
    dense = np.zeros((6, 3), dtype=np.float32)
    dense[3, 1] = 1.5
    dense[5, 0] = 2.5
    with pytest.raises(DataError, match="first in cell 3"):
        validate_counts(sp.csr_matrix(dense), "x")


def test_non_integer_allowed_with_the_flag():
    x = _csr_with(0.5, row=2)
    validate_counts(x, "x", allow_non_integer=True)
    # The flag does not excuse NaN or negative values.
    with pytest.raises(DataError, match="NaN/inf"):
        validate_counts(_csr_with(np.nan, row=0), "x", allow_non_integer=True)
    with pytest.raises(DataError, match="negative"):
        validate_counts(_csr_with(-0.5, row=0), "x", allow_non_integer=True)


def test_builtin_pbmc_has_integer_counts_of_the_documented_shape(builtin_adata):
    adata = builtin_adata
    assert adata.shape == (700, 765)
    assert sp.issparse(adata.X)
    data = adata.X.data
    assert np.all(data > 0)  # explicit zeros eliminated
    np.testing.assert_array_equal(data, np.round(data))
    assert {"bulk_labels", "n_counts", "louvain", "phase"} <= set(adata.obs)
    assert adata.obs["bulk_labels"].nunique() == 10
    assert adata.var_names.is_unique
    validate_counts(adata.X, "pbmc68k_reduced")


def test_builtin_pbmc_counts_reproduce_the_stored_lognormalised_values(builtin_adata):
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    assert list(src.raw.var_names) == list(builtin_adata.var_names)
    counts = builtin_adata.X.toarray().astype(np.float64)
    n_counts = src.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    # scanpy's normalize_total(target_sum=1e4) on the full gene set (n_counts), then log1p.
    relog = np.log1p(counts / n_counts * 1e4)
    stored = src.raw.X.toarray().astype(np.float64)
    np.testing.assert_array_equal(relog > 0, stored > 0)  # same sparsity pattern
    # raw.X is stored with 3 decimals: half a unit in the last place plus float32 rounding.
    assert np.abs(relog - stored).max() < 2e-3


def test_unknown_builtin_lists_available():
    with pytest.raises(DataError, match="available: pbmc68k_reduced"):
        load_builtin("pbmc3k")


def test_read_counts_moves_a_layer_into_x(tmp_path, counts_adata):
    adata = counts_adata(n_cells=10, n_genes=6)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    out = read_counts(path, layer="counts")
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    np.testing.assert_array_equal(out.X.toarray(), adata.layers["counts"].toarray())
    assert list(out.obs["cell_type"]) == list(adata.obs["cell_type"])
    assert list(out.var_names) == list(adata.var_names)
    np.testing.assert_allclose(read_counts(path).X.toarray(), adata.X.toarray(), rtol=1e-6)


def test_read_counts_errors(tmp_path, counts_adata):
    with pytest.raises(DataError, match="does not exist"):
        read_counts(tmp_path / "missing.h5ad")
    csv = tmp_path / "cells.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="expected an .h5ad"):
        read_counts(csv)
    path = tmp_path / "cells.h5ad"
    counts_adata(n_cells=4, n_genes=3).write_h5ad(path)
    with pytest.raises(DataError, match=r"no layer 'counts'"):
        read_counts(path, layer="counts")
    empty_x = tmp_path / "empty_x.h5ad"
    ad.AnnData(obs=counts_adata(n_cells=4, n_genes=3).obs).write_h5ad(empty_x)
    with pytest.raises(DataError, match="X is empty"):
        read_counts(empty_x)
