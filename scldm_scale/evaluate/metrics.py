"""Metrics that compare generated cells with real ones.

Everything here is numpy/scipy/sklearn/POT on host arrays (cells × features); our code never uses torch.
The usual pipeline is: raw counts → `normalize_log1p` → `PCAProjector` fitted on real train cells →
distribution metrics in PC space, plus gene-level metrics on the log-normalised (or raw) genes.

Distribution metrics on point clouds (x real, y generated, both (cells, d)):
  `mmd_rbf`, `wasserstein2`, `frechet_distance` (0 is perfect), `one_nn_accuracy`,
  `classifier_two_sample_accuracy` (0.5 is perfect), `precision_recall_knn` (1 is perfect).
Gene-level metrics on (cells, genes) matrices, dense or sparse:
  `moment_agreement` / `mean_var_r2` (1 is perfect), `dropout_mae` (0 is perfect); `highly_variable_genes`
  picks the genes to restrict them to.
Point-cloud metrics subsample each side to `max_cells` rows, without replacement, with
np.random.default_rng(seed), so a call is deterministic under its seed.
"""

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.linalg import sqrtm
from scipy.spatial.distance import cdist, pdist
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

# The median heuristic sets the scale; the multiples cover structure finer and coarser than it.
MEDIAN_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)
# pdist is quadratic in memory; the median of a fixed 2000-point subsample is stable and cheap.
MEDIAN_SUBSAMPLE = 2000
# Rows of the kernel matrix built at a time, so memory stays O(block × n) for large sets.
KERNEL_BLOCK_ROWS = 1024
# Added to both covariances when sqrtm of their product is not finite (the usual FID safeguard).
FRECHET_SQRTM_EPS = 1e-6
# The network simplex needs more pivots than POT's default 1e5 at a few thousand points per side.
EMD_MAX_ITERATIONS = 10_000_000

Matrix = np.ndarray | sp.spmatrix | sp.sparray


def _dense_float64(x: Matrix) -> np.ndarray:
    if sp.issparse(x):
        return x.toarray().astype(np.float64, copy=False)
    return np.asarray(x, dtype=np.float64)


def _point_clouds(caller: str, x: Matrix, y: Matrix) -> tuple[np.ndarray, np.ndarray]:
    """x (n, d) and y (m, d) as dense float64, after checking they are non-empty, finite and of equal d."""
    x = _dense_float64(x)
    y = _dense_float64(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(x.shape) == 0 or min(y.shape) == 0:
        raise ValueError(f"{caller} needs two non-empty (n, d) arrays with equal d; got {x.shape} and {y.shape}.")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{caller} needs finite values; the arrays of shape {x.shape} and {y.shape} hold NaN or inf.")
    return x, y


def _gene_matrix(caller: str, x: Matrix) -> Matrix:
    """A (cells, genes) matrix as float64, checked to be non-empty and finite; a sparse one stays sparse (CSR)."""
    x = sp.csr_matrix(x, dtype=np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or min(x.shape) == 0:
        raise ValueError(f"{caller} needs a non-empty (cells, genes) matrix; got shape {x.shape}.")
    if not np.isfinite(x.data if sp.issparse(x) else x).all():
        raise ValueError(f"{caller} needs finite values; the matrix of shape {x.shape} holds NaN or inf.")
    return x


def _gene_matrices(caller: str, real: Matrix, generated: Matrix) -> tuple[Matrix, Matrix]:
    """Both matrices through `_gene_matrix`, checked to have the same genes."""
    real = _gene_matrix(caller, real)
    generated = _gene_matrix(caller, generated)
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"{caller}: gene counts differ, real {real.shape} vs generated {generated.shape}.")
    return real, generated


def _subsample_rows(x: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """At most max_rows rows of x, drawn without replacement and kept in their original order."""
    if len(x) <= max_rows:
        return x
    return x[np.sort(rng.choice(len(x), max_rows, replace=False))]


def _positive_int(caller: str, name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{caller}: {name} must be a positive integer; got {value}.")


def normalize_log1p(counts: Matrix, target_sum: float = 1e4) -> np.ndarray:
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
    x, y = _point_clouds("mmd_rbf", x, y)
    if bandwidths is None:
        s = _median_bandwidths(np.concatenate([x, y]))
    else:
        s = np.asarray(bandwidths, dtype=np.float64).ravel()
        if len(s) == 0 or np.any(s <= 0):
            raise ValueError(f"mmd_rbf bandwidths must be a non-empty list of positive floats; got {bandwidths}.")
    return _mean_kernel(x, x, s) + _mean_kernel(y, y, s) - 2.0 * _mean_kernel(x, y, s)


def wasserstein2(x: np.ndarray, y: np.ndarray, max_cells: int = 2000, seed: int = 0) -> float:
    """2-Wasserstein distance between the empirical distributions of x (n, d) and y (m, d); 0 is perfect.

    W2 = sqrt(min over couplings P of sum_ij P_ij ||x_i - y_j||²), uniform weights 1/n and 1/m, solved
    exactly by POT's network simplex (`ot.emd2` on the squared-Euclidean cost `ot.dist`). Each side is
    first subsampled without replacement to at most max_cells rows (x, then y, from one
    np.random.default_rng(seed)): the solve is about cubic in the number of points, and the cost matrix
    takes max_cells² floats. In the same units as x; a set against itself gives 0, against itself
    translated by v gives ||v||.
    """
    # POT loads every array backend it finds (torch included) on import, seconds that only this needs.
    import ot

    x, y = _point_clouds("wasserstein2", x, y)
    _positive_int("wasserstein2", "max_cells", max_cells)
    rng = np.random.default_rng(seed)
    x = _subsample_rows(x, max_cells, rng)
    y = _subsample_rows(y, max_cells, rng)
    cost, log = ot.emd2(ot.unif(len(x)), ot.unif(len(y)), ot.dist(x, y), numItermax=EMD_MAX_ITERATIONS, log=True)
    if log["warning"] is not None:
        raise RuntimeError(f"wasserstein2: the exact OT solve on {x.shape} vs {y.shape} failed: {log['warning']}")
    return float(np.sqrt(max(float(cost), 0.0)))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of x (n, d) and y (m, d), as in FID; 0 is perfect.

    FD = ||μx - μy||² + Tr(Σx + Σy - 2 (Σx Σy)^{1/2}), with sample means and np.cov covariances
    (ddof=1, so each side needs at least 2 rows). Squared units of x; it only sees the first two
    moments. (Σx Σy)^{1/2} comes from scipy.linalg.sqrtm, keeping its real part (rounding leaves a tiny
    imaginary one); if that square root is not finite, it is recomputed with 1e-6·I added to both
    covariances, with a warning. Identical sets give 0 up to rounding (~1e-12, either sign); for
    diagonal covariances FD = sum (μx - μy)² + sum (σx - σy)².
    """
    x, y = _point_clouds("frechet_distance", x, y)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(
            f"frechet_distance needs at least 2 rows per side for a covariance; got {x.shape} and {y.shape}."
        )
    mean_diff = x.mean(axis=0) - y.mean(axis=0)
    cov_x = np.atleast_2d(np.cov(x, rowvar=False))  # (d, d), also for d = 1
    cov_y = np.atleast_2d(np.cov(y, rowvar=False))
    cov_sqrt = sqrtm(cov_x @ cov_y)
    if not np.isfinite(cov_sqrt).all():
        warnings.warn(
            f"frechet_distance: sqrtm(Σx Σy) is not finite for covariances of shape {cov_x.shape}; "
            f"retrying with {FRECHET_SQRTM_EPS}·I added to both.",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = FRECHET_SQRTM_EPS * np.eye(len(cov_x))
        cov_sqrt = sqrtm((cov_x + offset) @ (cov_y + offset))
    return float(mean_diff @ mean_diff + np.trace(cov_x) + np.trace(cov_y) - 2.0 * np.trace(cov_sqrt.real))


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


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    xc = x - x.mean()
    yc = y - y.mean()
    return float((xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)))


def _gene_mean_var(x: Matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and variance (ddof=0) of (cells, genes); a sparse matrix is never densified."""
    if sp.issparse(x):
        mean = np.asarray(x.mean(axis=0)).ravel()
        # E[x²] - E[x]² can round just below 0 for a constant gene.
        var = np.maximum(np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2, 0.0)
        return mean, var
    return x.mean(axis=0), x.var(axis=0)


def moment_agreement(real: Matrix, generated: Matrix) -> dict[str, float]:
    """How well per-gene means and variances of the generated cells match the real ones; 1 is perfect.

    real (n, genes) and generated (m, genes), dense or sparse, typically log-normalised. Per gene, the
    mean and the variance (ddof=0) over cells; then over genes, `r2` with the generated values predicting
    the real ones (mean_r2, var_r2; can be negative) and the `pearson` correlation (mean_pearson,
    var_pearson; NaN when either side is constant across genes).
    """
    real, generated = _gene_matrices("moment_agreement", real, generated)
    real_mean, real_var = _gene_mean_var(real)
    generated_mean, generated_var = _gene_mean_var(generated)
    return {
        "mean_r2": r2(real_mean, generated_mean),
        "var_r2": r2(real_var, generated_var),
        "mean_pearson": pearson(real_mean, generated_mean),
        "var_pearson": pearson(real_var, generated_var),
    }


def mean_var_r2(real: Matrix, generated: Matrix) -> dict[str, float]:
    """R² of per-gene means and per-gene variances (ddof=0), the generated cells predicting the real.

    The mean_r2 and var_r2 entries of `moment_agreement`.
    """
    agreement = moment_agreement(real, generated)
    return {"mean_r2": agreement["mean_r2"], "var_r2": agreement["var_r2"]}


def dropout_mae(real_counts: Matrix, generated_counts: Matrix) -> float:
    """Mean over genes of |zero fraction in real - zero fraction in generated|; 0 is perfect, 1 the worst.

    The zero fraction of a gene is the share of cells where it is exactly 0, so pass counts (or any
    transform that keeps zeros at zero). Dense or sparse (cells, genes); explicitly stored zeros of a
    sparse matrix count as zeros.
    """
    real, generated = _gene_matrices("dropout_mae", real_counts, generated_counts)
    zero_fractions = [1.0 - np.asarray((x != 0).sum(axis=0)).ravel() / x.shape[0] for x in (real, generated)]
    return float(np.abs(zero_fractions[0] - zero_fractions[1]).mean())


def _balanced_pool(
    caller: str, x: np.ndarray, y: np.ndarray, max_cells: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """x and y subsampled to k = min(n, m, max_cells) rows each and stacked (2k, d), with labels 0 for x, 1 for y."""
    _positive_int(caller, "max_cells", max_cells)
    n_per_side = min(len(x), len(y), max_cells)
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([_subsample_rows(x, n_per_side, rng), _subsample_rows(y, n_per_side, rng)])
    return pooled, np.repeat([0, 1], n_per_side)


def one_nn_accuracy(x: np.ndarray, y: np.ndarray, max_cells: int = 1000, seed: int = 0) -> float:
    """Leave-one-out 1-nearest-neighbour two-sample accuracy; 0.5 is perfect, 1.0 perfectly separable.

    Both sets are subsampled without replacement to k = min(n, m, max_cells) rows each (x, then y, from
    one np.random.default_rng(seed); a set of exactly k rows is kept whole), so chance is 0.5. Each of
    the 2k pooled points is labelled with the source of its nearest other point (Euclidean, sklearn
    NearestNeighbors, the point itself excluded), and the accuracy is the fraction labelled correctly.
    Well below 0.5 means the generated points sit on top of real ones (memorisation): a set against an
    exact copy of itself gives 0.0, since each point's nearest other point is its copy at distance 0
    (when no point of a set is repeated within it).
    """
    x, y = _point_clouds("one_nn_accuracy", x, y)
    pooled, labels = _balanced_pool("one_nn_accuracy", x, y, max_cells, seed)
    # kneighbors without X leaves each point out of its own neighbours, also when a copy of it exists.
    _, nearest = NearestNeighbors(n_neighbors=1).fit(pooled).kneighbors()
    return float((labels[nearest[:, 0]] == labels).mean())


def classifier_two_sample_accuracy(
    x: np.ndarray, y: np.ndarray, seed: int = 0, max_cells: int = 2000, n_folds: int = 5
) -> float:
    """Classifier two-sample test (C2ST): held-out accuracy of a classifier telling x from y; 0.5 is perfect.

    Both sets are subsampled without replacement to k = min(n, m, max_cells) rows each (as in
    `one_nn_accuracy`), so chance is 0.5; the accuracy is the mean over a stratified, shuffled
    n_folds-fold split (random_state=seed). The classifier is sklearn's HistGradientBoostingClassifier
    with 50 trees of at most 15 leaves: trees catch differences a linear model misses (variances,
    correlations, extra or missing modes) without needing the features scaled, and at this size it
    fits 5 folds of 2 × 2000 cells × 30 PCs in about a second. On identical distributions it scores
    around 0.5 (slightly below is noise); 1.0 means perfectly separable.
    """
    x, y = _point_clouds("classifier_two_sample_accuracy", x, y)
    pooled, labels = _balanced_pool("classifier_two_sample_accuracy", x, y, max_cells, seed)
    if n_folds < 2 or len(pooled) // 2 < n_folds:
        raise ValueError(
            f"classifier_two_sample_accuracy needs 2 <= n_folds <= cells per side; got n_folds={n_folds} "
            f"with {len(pooled) // 2} cells per side from {x.shape} and {y.shape}."
        )
    classifier = HistGradientBoostingClassifier(max_iter=50, max_leaf_nodes=15, random_state=seed)
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    # One OpenMP thread: at these sizes threads only add overhead, and after scanpy's numba code has run
    # in the process, sklearn may pick up a raised thread count and oversubscribe a busy machine.
    with threadpool_limits(limits=1, user_api="openmp"):
        return float(cross_val_score(classifier, pooled, labels, cv=folds, scoring="accuracy").mean())


def _kth_neighbour_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row."""
    # Column 0 of the sorted row is the point itself (distance 0), so index k is the k-th other point.
    return np.partition(cdist(x, x), k, axis=1)[:, k]


def precision_recall_knn(
    real: np.ndarray, generated: np.ndarray, k: int = 5, max_cells: int = 2000, seed: int = 0
) -> dict[str, float]:
    """k-NN precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020).

    Each real point r_i gets a ball of radius ρ_i = distance to its k-th nearest other real point, each
    generated point g_j a ball of radius γ_j the same way within the generated set; points count as
    inside a ball when strictly closer than its radius (as in Naeem et al.'s reference code). With N real
    and M generated points:
      precision = (1/M) Σ_j 1[g_j in some real ball]          (fidelity: generated cells look real)
      recall    = (1/N) Σ_i 1[r_i in some generated ball]     (diversity: real cells are reproduced)
      density   = (1/(kM)) Σ_j #{i : g_j in real ball i}      (fidelity, robust to real outliers)
      coverage  = (1/N) Σ_i 1[some g_j in real ball i]        (diversity, robust to generated outliers)
    All four are 1 when generated equals real (density exactly 1 when no distances tie: each real ball
    then holds its centre and k - 1 others); precision, recall and coverage are at most 1, density can
    exceed 1. Each side is first subsampled without replacement to at most max_cells rows (real, then
    generated, from one np.random.default_rng(seed)), since the distance matrices take max_cells² floats;
    k must be smaller than each side's row count.
    """
    real, generated = _point_clouds("precision_recall_knn", real, generated)
    _positive_int("precision_recall_knn", "k", k)
    _positive_int("precision_recall_knn", "max_cells", max_cells)
    rng = np.random.default_rng(seed)
    real = _subsample_rows(real, max_cells, rng)
    generated = _subsample_rows(generated, max_cells, rng)
    if k >= min(len(real), len(generated)):
        raise ValueError(
            f"precision_recall_knn needs k < the rows of each side; got k={k} with {real.shape} and {generated.shape}."
        )
    real_radii = _kth_neighbour_radii(real, k)  # (N,)
    generated_radii = _kth_neighbour_radii(generated, k)  # (M,)
    distances = cdist(real, generated)  # (N, M)
    in_real_ball = distances < real_radii[:, None]  # (N, M)
    in_generated_ball = distances < generated_radii[None, :]  # (N, M)
    return {
        "precision": float(in_real_ball.any(axis=0).mean()),
        "recall": float(in_generated_ball.any(axis=1).mean()),
        "density": float(in_real_ball.sum(axis=0).mean() / k),
        "coverage": float(in_real_ball.any(axis=1).mean()),
    }


def highly_variable_genes(x_lognorm: Matrix, n_top: int = 2000) -> np.ndarray:
    """Indices (ascending) of the n_top most variable genes of log-normalised (cells, genes), dense or sparse.

    scanpy's `sc.pp.highly_variable_genes(flavor="seurat")` on a temporary AnnData: genes are binned by
    mean expression into 20 bins and ranked by their dispersion (variance / mean), z-scored within
    the bin. Fit it on real cells and apply the indices to real and generated alike. n_top is capped at
    the number of genes, and asking for at least every gene returns them all.
    """
    _positive_int("highly_variable_genes", "n_top", n_top)
    x = _gene_matrix("highly_variable_genes", x_lognorm)
    n_genes = x.shape[1]
    if n_top >= n_genes:
        return np.arange(n_genes)
    # scanpy takes seconds to import (numba, dask, ...) and only this function needs it.
    import anndata
    import scanpy as sc

    hvg = sc.pp.highly_variable_genes(anndata.AnnData(x), flavor="seurat", n_top_genes=n_top, inplace=False)
    return np.flatnonzero(hvg["highly_variable"].to_numpy())
