"""Baselines that generated cells must beat, each producing cells for the real cells' conditions.

- `real_train_cells`: real training cells with the same condition composition as the real cells. They
  were never generated, so their score is the metric's noise floor: no model should be expected to
  beat it.
- `independent_nb` (`IndependentNB`): knows each condition's per-gene mean and dispersion but nothing
  about gene–gene correlation: if scLDM does not beat it, the model has learned no more than marginals.
The scVI baseline is in `scvi_baseline.py` (an optional extra).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scldm_scale.data.counts import DataError
from scldm_scale.evaluate.conditions import combination_labels

log = logging.getLogger(__name__)


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

    def fit(self, counts: np.ndarray | sp.spmatrix | sp.sparray, labels: Sequence | np.ndarray) -> IndependentNB:
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


def _requests(real_labels: pd.DataFrame, train_labels: pd.DataFrame) -> list[tuple[str, int, np.ndarray]]:
    """(combination, cells wanted, train rows of it) for each real combination the train cells have."""
    real_combo, train_combo = combination_labels(real_labels), combination_labels(train_labels)
    out = []
    for combo, n in zip(*np.unique(real_combo, return_counts=True), strict=True):
        rows = np.flatnonzero(train_combo == combo)
        if len(rows) == 0:
            log.info("no training cells of %s: the baselines fitted on training cells skip it", combo)
            continue
        out.append((combo, int(n), rows))
    if not out:
        raise DataError(
            f"the training cells hold none of the real cells' condition combinations (real: "
            f"{sorted(set(real_combo))[:5]}, train: {sorted(set(train_combo))[:5]}); check --condition-key, or "
            "leave out the baselines fitted on training cells (--baselines)"
        )
    return out


def _labels_for(real_labels: pd.DataFrame, requests: list[tuple[str, int, np.ndarray]]) -> pd.DataFrame:
    real_combo = combination_labels(real_labels)
    first = [np.flatnonzero(real_combo == combo)[0] for combo, _, _ in requests]
    reps = [n for _, n, _ in requests]
    return real_labels.iloc[np.repeat(first, reps)].reset_index(drop=True)


def matched_train_rows(
    train_labels: pd.DataFrame, real_labels: pd.DataFrame, seed: int
) -> tuple[np.ndarray, pd.DataFrame]:
    """Rows of training cells with the real cells' composition of condition combinations, and their labels.

    Drawn without replacement where the training cells of a combination suffice, with it otherwise.
    """
    rng = np.random.default_rng(seed)
    requests = _requests(real_labels, train_labels)
    rows = [rng.choice(pool, size=n, replace=len(pool) < n) for _, n, pool in requests]
    return np.concatenate(rows), _labels_for(real_labels, requests)


def independent_nb_cells(
    train_counts: sp.csr_matrix, train_labels: pd.DataFrame, real_labels: pd.DataFrame, seed: int
) -> tuple[np.ndarray, pd.DataFrame]:
    """Samples of an `IndependentNB` fitted per condition combination on the training cells."""
    requests = _requests(real_labels, train_labels)
    log.info("independent_nb baseline: fitted on %d training cells", train_counts.shape[0])
    model = IndependentNB().fit(train_counts, combination_labels(train_labels))
    wanted = np.repeat([combo for combo, _, _ in requests], [n for _, n, _ in requests])
    return model.sample(wanted, seed=seed), _labels_for(real_labels, requests)
