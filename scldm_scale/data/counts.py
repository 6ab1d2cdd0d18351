"""Reading raw counts from AnnData and refusing what is not raw counts.

Built-in datasets: scanpy's `pbmc68k_reduced`, which ships log-normalised; its integer counts are
recovered exactly as round(expm1(raw.X) * n_counts / 1e4), and the recovery is checked, not assumed.
`synthetic_perturbation`: seeded NB counts of cell lines x perturbations with planted effects
(scldm_scale/data/synthetic.py, its default sizes).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:  # imported where used: DataError and validate_counts serve code that runs without anndata
    import anndata as ad

BUILTIN_DATASETS = ("pbmc68k_reduced", "synthetic_perturbation")
RAW_X = "raw.X"  # the name a `--layer` flag (or data.layer) gives to .raw.X
# How a training config fixes non-integer counts; commands pass their own flags (`layer_fix`).
CONFIG_FIX = (
    "point data.layer at the counts layer, or set data.allow_non_integer=true if the values are deliberately "
    "non-integer"
)
# raw.X of pbmc68k_reduced is stored with 3 decimals, so a recovered count x carries a relative error
# of about 5e-4: every entry lies within 0.03 + 6e-4 * x of an integer (0.08 at the largest, 213).
_PBMC_ABS_TOLERANCE = 0.03
_PBMC_REL_TOLERANCE = 6e-4


class DataError(ValueError):
    """Input data that cannot be trained on; the message says what, where and how to fix it."""


def unreadable_h5ad(path: str | Path, err: BaseException) -> DataError:
    """The refusal of an .h5ad that h5py or anndata cannot read (truncated, not HDF5, not an AnnData)."""
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    return DataError(
        f"{path}: cannot read as an .h5ad ({detail}); the file is damaged (e.g. truncated by an interrupted copy "
        "or download) or is not an AnnData file: copy it again, or write it again with anndata's write_h5ad"
    )


def read_h5ad(path: str | Path, backed: str | None = None) -> ad.AnnData:
    """anndata.read_h5ad (in `backed` mode if given), with an unreadable file refused by `unreadable_h5ad`."""
    import anndata as ad

    try:
        return ad.read_h5ad(path, backed=backed)
    except Exception as err:  # h5py's OSError, anndata's KeyError/ValueError/AnnDataReadError on a foreign file
        raise unreadable_h5ad(path, err) from err


def validate_counts(
    x: sp.csr_matrix | np.ndarray, where: str, allow_non_integer: bool = False, fix: str = CONFIG_FIX
) -> None:
    """Reject NaN/inf, negative and (unless allowed) non-integer counts, naming the first bad cell; `fix` says
    how to point the reader at the counts (the caller's own flags: `layer_fix`)."""
    problem = count_problem(x, allow_non_integer)
    if problem is None:
        return
    if "non-integer" in problem:
        raise DataError(f"{where}: {problem}; the model needs raw integer counts — {fix}")
    raise DataError(f"{where}: {problem}")


def layer_fix(layers: list[str], has_raw: bool, flag: str = "--layer") -> str:
    """How a command's user points it at the raw counts of an AnnData: its layers and .raw.X, by `flag`."""
    where = [f"a layer ({', '.join(layers)})"] if layers else []
    where += [f"{RAW_X} (.raw.X holds the counts of many published files)"] if has_raw else []
    if not where:
        return f"this file has no layers and no .raw: write its raw counts to X or to a layer and pass {flag} NAME"
    return f"pass {flag} with " + " or ".join(where)


def validate_labels(obs, keys, where: str) -> None:
    """Refuse missing values (NaN / None) in the label columns `keys` of an obs table: as text they would
    become a class called "nan" that a model conditions on."""
    for key in keys:
        missing = obs[key].isna().to_numpy()
        if missing.any():
            first = obs.index[np.flatnonzero(missing)[0]]
            raise DataError(
                f"{where}: label column {key!r} has {int(missing.sum())} missing values (first: cell {first}); "
                f"fill them (e.g. obs[{key!r}] = obs[{key!r}].astype(str).where(obs[{key!r}].notna(), 'unknown')) "
                "or drop those cells"
            )


def count_problem(x: sp.csr_matrix | np.ndarray, allow_non_integer: bool = False) -> str | None:
    """What keeps a block of cells from being raw counts (NaN/inf, negative or non-integer values, the first
    bad cell named), or None when it is counts."""
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    if values.size == 0:
        return None
    bad = ~np.isfinite(values)
    if bad.any():
        return f"{int(bad.sum())} NaN/inf values (first in cell {_first_cell(x, bad)}); counts must be finite"
    negative = values < 0
    if negative.any():
        return (
            f"{int(negative.sum())} negative values (min {values.min()}, first in cell "
            f"{_first_cell(x, negative)}); raw counts are >= 0"
        )
    if not allow_non_integer:
        fractional = np.abs(values - np.round(values)) > 1e-6
        if fractional.any():
            return f"{int(fractional.sum())} non-integer values (first in cell {_first_cell(x, fractional)})"
    return None


def _first_cell(x: sp.csr_matrix | np.ndarray, flags: np.ndarray) -> int:
    idx = int(np.argmax(flags))
    if sp.issparse(x):
        return int(np.searchsorted(x.indptr, idx, side="right") - 1)
    return idx // x.shape[1]


def load_builtin(name: str) -> ad.AnnData:
    """A dataset that ships inside an installed package (or is generated by one), with integer counts in X."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset {name!r}; available: {', '.join(BUILTIN_DATASETS)}")
    if name == "synthetic_perturbation":
        from scldm_scale.data.synthetic import synthetic_perturbation

        return synthetic_perturbation()
    import anndata as ad
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


def read_counts(path: str | Path, layer: str | None = None, flag: str | None = None) -> ad.AnnData:
    """Read an .h5ad and return an AnnData whose X is the CSR count matrix (a layer or `RAW_X` moved into X).
    Given the `flag` that chose the layer, the counts are validated here and a refusal names that flag and the
    file's layers; without it the caller validates (training names its config keys)."""
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.suffix != ".h5ad":
        raise DataError(f"{path}: expected an .h5ad file")
    adata = read_h5ad(path)
    name = f"{flag} " if flag else "data.layer="
    var = adata.var
    if layer == RAW_X:
        if adata.raw is None:
            raise DataError(f"{path}: {name}{RAW_X} but the file has no .raw; layers are {list(adata.layers)}")
        x, var = adata.raw.X, adata.raw.var
    elif layer is not None:
        if layer not in adata.layers:
            raise DataError(
                f"{path}: no layer {layer!r}; layers are {list(adata.layers)}"
                + (f", and .raw.X ({name}{RAW_X})" if adata.raw is not None else "")
                + (f" (omit {flag} to use X)" if flag else " (null means X)")
            )
        x = adata.layers[layer]
    else:
        x = adata.X
    if x is None:
        raise DataError(
            f"{path}: X is empty; {layer_fix(list(adata.layers), adata.raw is not None, flag or 'data.layer')}"
        )
    out = ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs=adata.obs.copy(), var=var.copy())
    if flag is not None:
        source = f"{path} ({RAW_X if layer == RAW_X else f'layer {layer!r}' if layer else 'X'})"
        validate_counts(out.X, source, fix=layer_fix(list(adata.layers), adata.raw is not None, flag))
    return out
