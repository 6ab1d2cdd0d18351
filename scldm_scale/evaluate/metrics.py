"""Metrics that compare generated cells with real ones.

Everything here is numpy/scipy/sklearn on host arrays (cells × features); nothing imports torch.
The usual pipeline is: raw counts → `normalize_log1p` → `PCAProjector` fitted on real train cells →
`mmd_rbf` in PC space, plus `mean_var_r2` / `pearson` on the log-normalised genes.
"""

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.spatial.distance import pdist
from sklearn.decomposition import PCA

# The median heuristic sets the scale; the multiples cover structure finer and coarser than it.
MEDIAN_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)
# pdist is quadratic in memory; the median of a fixed 2000-point subsample is stable and cheap.
MEDIAN_SUBSAMPLE = 2000
# Rows of the kernel matrix built at a time, so memory stays O(block × n) for large sets.
KERNEL_BLOCK_ROWS = 1024


def _dense_float64(x: np.ndarray | sp.spmatrix | sp.sparray) -> np.ndarray:
    if sp.issparse(x):
        return x.toarray().astype(np.float64, copy=False)
    return np.asarray(x, dtype=np.float64)


def normalize_log1p(counts: np.ndarray | sp.spmatrix | sp.sparray, target_sum: float = 1e4) -> np.ndarray:
    """log1p(counts / row total * target_sum) as a dense float64 array; all-zero rows stay zero."""
    x = _dense_float64(counts)
    row_total = x.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, row_total, out=np.zeros_like(row_total), where=row_total > 0)
    return np.log1p(x * scale)


class PCAProjector:
    """PCA fitted once on real train cells and applied to real and generated cells alike."""

    def __init__(self) -> None:
        self.pca: PCA | None = None

    def fit(self, x_lognorm: np.ndarray, n_components: int = 30) -> "PCAProjector":
        """Fit on (cells, genes); n_components is capped at min(cells, genes) - 1."""
        x = np.asarray(x_lognorm, dtype=np.float64)
        n_components = max(1, min(n_components, min(x.shape) - 1))
        self.pca = PCA(n_components=n_components, svd_solver="full", random_state=0).fit(x)
        return self

    def transform(self, x_lognorm: np.ndarray) -> np.ndarray:
        """Project (cells, genes) to (cells, n_components)."""
        if self.pca is None:
            raise RuntimeError("PCAProjector.transform called before fit; call fit on real train cells first.")
        return self.pca.transform(np.asarray(x_lognorm, dtype=np.float64))


def _median_bandwidths(pooled: np.ndarray) -> np.ndarray:
    if len(pooled) > MEDIAN_SUBSAMPLE:
        rows = np.random.default_rng(0).choice(len(pooled), MEDIAN_SUBSAMPLE, replace=False)
        pooled = pooled[np.sort(rows)]
    median = float(np.median(pdist(pooled)))
    if median == 0.0:
        raise ValueError(
            "mmd_rbf: the median pairwise distance of the pooled points is 0 (most points coincide), "
            "so the default bandwidths are degenerate; pass explicit bandwidths."
        )
    return median * np.asarray(MEDIAN_MULTIPLES)


def _mean_kernel(a: np.ndarray, b: np.ndarray, bandwidths: np.ndarray) -> float:
    """Mean over all (i, j) pairs and over bandwidths of exp(-||a_i - b_j||^2 / (2 s^2))."""
    b_sq = (b * b).sum(axis=1)
    inv_two_var = 1.0 / (2.0 * bandwidths**2)
    total = 0.0
    for start in range(0, len(a), KERNEL_BLOCK_ROWS):
        block = a[start : start + KERNEL_BLOCK_ROWS]
        # The expanded form can dip just below 0 by rounding; a negative distance would exceed k=1.
        sq_dist = np.maximum((block * block).sum(axis=1)[:, None] + b_sq[None, :] - 2.0 * block @ b.T, 0.0)
        for c in inv_two_var:
            total += np.exp(-c * sq_dist).sum()
    return total / (len(a) * len(b) * len(bandwidths))


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidths: Sequence[float] | None = None) -> float:
    """Squared MMD between samples x (n, d) and y (m, d), biased V-statistic.

    MMD² = mean K(x, x) + mean K(y, y) - 2 mean K(x, y), diagonals included, so a set compared with
    itself gives exactly 0 and the value is never negative. The kernel is the average (not the sum) of
    RBF kernels k(a, b) = exp(-||a - b||² / (2 s²)) over the bandwidths s, so values stay comparable
    across bandwidth counts. By default s = median pairwise Euclidean distance of the pooled x ∪ y times
    (0.25, 0.5, 1, 2, 4); with more than 2000 pooled points the median comes from a seed-0 subsample of
    2000 (the MMD itself always uses every point).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or len(x) == 0 or len(y) == 0:
        raise ValueError(f"mmd_rbf needs two non-empty (n, d) arrays with equal d; got {x.shape} and {y.shape}.")
    if bandwidths is None:
        s = _median_bandwidths(np.concatenate([x, y]))
    else:
        s = np.asarray(bandwidths, dtype=np.float64).ravel()
        if len(s) == 0 or np.any(s <= 0):
            raise ValueError(f"mmd_rbf bandwidths must be a non-empty list of positive floats; got {bandwidths}.")
    return _mean_kernel(x, x, s) + _mean_kernel(y, y, s) - 2.0 * _mean_kernel(x, y, s)


def r2(x_true: np.ndarray, x_pred: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot of x_pred against x_true (1-D).

    A constant x_true follows sklearn's r2_score: 1.0 for a perfect prediction, else 0.0.
    """
    x_true = np.asarray(x_true, dtype=np.float64).ravel()
    x_pred = np.asarray(x_pred, dtype=np.float64).ravel()
    ss_res = float(((x_true - x_pred) ** 2).sum())
    ss_tot = float(((x_true - x_true.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def mean_var_r2(
    real: np.ndarray | sp.spmatrix | sp.sparray, generated: np.ndarray | sp.spmatrix | sp.sparray
) -> dict[str, float]:
    """R² of per-gene means and per-gene variances (ddof=0), the generated cells predicting the real."""
    real = _dense_float64(real)
    generated = _dense_float64(generated)
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"mean_var_r2: gene counts differ, real {real.shape} vs generated {generated.shape}.")
    return {
        "mean_r2": r2(real.mean(axis=0), generated.mean(axis=0)),
        "var_r2": r2(real.var(axis=0), generated.var(axis=0)),
    }


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    xc = x - x.mean()
    yc = y - y.mean()
    return float((xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)))
