"""Reading raw counts from AnnData and refusing what is not raw counts.

The built-in dataset is scanpy's `pbmc68k_reduced`, which ships log-normalised; its integer counts are
recovered exactly as round(expm1(raw.X) * n_counts / 1e4), and the recovery is checked, not assumed.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

BUILTIN_DATASETS = ("pbmc68k_reduced",)
# raw.X of pbmc68k_reduced is stored with 3 decimals, so a recovered count x carries a relative error
# of about 5e-4: every entry lies within 0.03 + 6e-4 * x of an integer (0.08 at the largest, 213).
_PBMC_ABS_TOLERANCE = 0.03
_PBMC_REL_TOLERANCE = 6e-4


class DataError(ValueError):
    """Input data that cannot be trained on; the message says what, where and how to fix it."""


def validate_counts(x: sp.csr_matrix | np.ndarray, where: str, allow_non_integer: bool = False) -> None:
    """Reject NaN/inf, negative and (unless allowed) non-integer counts, naming the first bad cell."""
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    if values.size == 0:
        return
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(
            f"{where}: {int(bad.sum())} NaN/inf values (first in cell {_first_cell(x, bad)}); counts must be finite"
        )
    negative = values < 0
    if negative.any():
        raise DataError(
            f"{where}: {int(negative.sum())} negative values (min {values.min()}, first in cell "
            f"{_first_cell(x, negative)}); raw counts are >= 0"
        )
    if not allow_non_integer:
        frac = np.abs(values - np.round(values))
        if (frac > 1e-6).any():
            first = _first_cell(x, frac > 1e-6)
            raise DataError(
                f"{where}: {int((frac > 1e-6).sum())} non-integer values (first in cell {first}); the model "
                "needs raw integer counts — point data.layer at the counts layer, or set "
                "data.allow_non_integer=true if the values are deliberately non-integer"
            )


def _first_cell(x: sp.csr_matrix | np.ndarray, flags: np.ndarray) -> int:
    idx = int(np.argmax(flags))
    if sp.issparse(x):
        return int(np.searchsorted(x.indptr, idx, side="right") - 1)
    return idx // x.shape[1]


def load_builtin(name: str) -> ad.AnnData:
    """A dataset that ships inside an installed package, with integer counts in X."""
    if name != "pbmc68k_reduced":
        raise DataError(f"unknown built-in dataset {name!r}; available: {', '.join(BUILTIN_DATASETS)}")
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    lognorm = sp.csr_matrix(src.raw.X, dtype=np.float64)
    n_counts = src.obs["n_counts"].to_numpy(dtype=np.float64)
    scaled = sp.diags(n_counts / 1e4) @ lognorm.expm1()
    scaled = sp.csr_matrix(scaled)
    deviation = np.abs(scaled.data - np.round(scaled.data))
    if (deviation > _PBMC_ABS_TOLERANCE + _PBMC_REL_TOLERANCE * scaled.data).any():
        raise DataError(f"pbmc68k_reduced counts did not recover as integers (max deviation {deviation.max():.3f})")
    counts = sp.csr_matrix((np.round(scaled.data), scaled.indices, scaled.indptr), shape=scaled.shape)
    counts.eliminate_zeros()
    adata = ad.AnnData(
        X=counts.astype(np.float32),
        obs=src.obs[["bulk_labels", "n_counts", "louvain", "phase"]].copy(),
        var=src.raw.var[[]].copy(),
    )
    adata.var["feature_name"] = adata.var_names.to_numpy()
    return adata


def read_counts(path: str | Path, layer: str | None = None) -> ad.AnnData:
    """Read an .h5ad and return an AnnData whose X is the CSR count matrix (layer moved into X)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.suffix != ".h5ad":
        raise DataError(f"{path}: expected an .h5ad file")
    adata = ad.read_h5ad(path)
    if layer is not None:
        if layer not in adata.layers:
            raise DataError(f"{path}: no layer {layer!r}; layers are {list(adata.layers)} (null means X)")
        x = adata.layers[layer]
    else:
        x = adata.X
    if x is None:
        raise DataError(f"{path}: X is empty; set data.layer to the layer with raw counts")
    out = ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs=adata.obs.copy(), var=adata.var.copy())
    return out
