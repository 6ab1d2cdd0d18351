"""Baselines that generated cells must beat.

`IndependentNB` knows each condition's per-gene mean and dispersion but nothing about gene–gene
correlation: if scLDM does not beat it on MMD, the model has learned no more than marginals.
"""

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp


def _moments(counts: np.ndarray | sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and unbiased variance of (cells, genes) counts; variance 0 for a single cell."""
    n = counts.shape[0]
    if sp.issparse(counts):
        mean = np.asarray(counts.mean(axis=0), dtype=np.float64).ravel()
        sq_mean = np.asarray(counts.multiply(counts).mean(axis=0), dtype=np.float64).ravel()
        var = np.maximum(sq_mean - mean**2, 0.0)
    else:
        mean = counts.mean(axis=0)
        var = counts.var(axis=0)
    if n > 1:
        var *= n / (n - 1)
    return mean, var


class IndependentNB:
    """Per-condition negative binomial, fitted gene by gene by the method of moments.

    For each label and gene with mean m and variance v: θ = m² / (v - m) when v > m (overdispersed);
    otherwise θ = inf and the gene is sampled as Poisson(m). Genes with m = 0 give zeros.
    After fit: `labels_` (sorted known labels), `mean_` and `theta_`, both (n_labels, n_genes).
    """

    def __init__(self) -> None:
        self.labels_: list = []
        self.mean_: np.ndarray | None = None
        self.theta_: np.ndarray | None = None

    def fit(self, counts: np.ndarray | sp.spmatrix | sp.sparray, labels: Sequence | np.ndarray) -> "IndependentNB":
        """Fit on raw counts (cells, genes), dense or sparse, with one condition label per cell."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != counts.shape[0]:
            raise ValueError(
                f"IndependentNB.fit: labels must be 1-D with one entry per cell; got shape {labels.shape} "
                f"for {counts.shape[0]} cells."
            )
        if sp.issparse(counts):
            counts = sp.csr_matrix(counts, dtype=np.float64)
            values = counts.data
        else:
            counts = values = np.asarray(counts, dtype=np.float64)
        if values.min(initial=0.0) < 0:
            raise ValueError("IndependentNB.fit: counts must be non-negative raw counts.")

        self.labels_ = np.unique(labels).tolist()
        means, thetas = [], []
        for label in self.labels_:
            mean, var = _moments(counts[labels == label])
            excess = var - mean
            theta = np.full_like(mean, np.inf)
            overdispersed = (excess > 0) & (mean > 0)
            theta[overdispersed] = mean[overdispersed] ** 2 / excess[overdispersed]
            means.append(mean)
            thetas.append(theta)
        self.mean_ = np.stack(means)
        self.theta_ = np.stack(thetas)
        return self

    def sample(self, labels: Sequence | np.ndarray, seed: int) -> np.ndarray:
        """Draw (len(labels), genes) int64 counts, row i from label i's model, via gamma–Poisson."""
        if self.mean_ is None or self.theta_ is None:
            raise RuntimeError("IndependentNB.sample called before fit.")
        labels = np.asarray(labels)
        unknown = sorted({str(label) for label in np.unique(labels) if label not in self.labels_})
        if unknown:
            raise ValueError(f"IndependentNB.sample: unknown label(s) {unknown}; known labels are {self.labels_}.")

        rng = np.random.default_rng(seed)
        out = np.zeros((len(labels), self.mean_.shape[1]), dtype=np.int64)
        for k, label in enumerate(self.labels_):
            rows = np.flatnonzero(labels == label)
            if len(rows) == 0:
                continue
            mean, theta = self.mean_[k], self.theta_[k]
            rate = np.broadcast_to(mean, (len(rows), len(mean))).copy()
            gamma_cols = np.isfinite(theta)
            # Gamma(shape θ, scale m/θ) has mean m and variance m²/θ; Poisson on top adds m: NB(m, θ).
            rate[:, gamma_cols] = rng.gamma(
                theta[gamma_cols],
                mean[gamma_cols] / theta[gamma_cols],
                size=(len(rows), int(gamma_cols.sum())),
            )
            out[rows] = rng.poisson(rate)
        return out
