"""Perturbation baselines for a condition combination that training never saw.

`additive_shift_baseline` is the reference a model must beat on an unseen (context, perturbation) pair,
such as a held-out `data.holdout_combinations` entry: it assumes the perturbation's effect is the same
additive shift of log-normalised expression in every context, measured where the pair was observed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scldm_scale.data.counts import DataError
from scldm_scale.evaluate.metrics import normalize_log1p

# Log-normalisation: log1p(counts / library size * TARGET_SUM), as in the evaluation metrics.
TARGET_SUM = 1e4


def _mean_lognorm(counts: np.ndarray | sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    return normalize_log1p(counts[rows], TARGET_SUM).mean(axis=0)  # (G,)


def additive_shift_baseline(
    counts: np.ndarray | sp.spmatrix | sp.sparray,
    obs: pd.DataFrame,
    target: dict[str, str],
    n_cells: int,
    seed: int,
    perturbation_key: str = "perturbation",
    context_key: str = "cell_line",
    control_value: str = "control",
) -> np.ndarray:
    """(n_cells, genes) int64 counts predicted for the pair target = {context_key: c, perturbation_key: p}.

    counts / obs: the training cells (cells x genes raw counts and their labels); the target pair's own
    cells are absent from them, which is the point. With y(x) = log1p(x / sum(x) * 1e4) per cell:
      Δ = mean over the other contexts c' with cells of both p and the control of
          [mean y over (c', p) cells − mean y over (c', control) cells]           (genes,)
    and each baseline cell is a control cell of c, drawn with replacement by a generator seeded with
    `seed`, moved by Δ: y' = max(y + Δ, 0), mapped back to counts with that control cell's library size
    L as round(expm1(y') · L / 1e4). (Its total is then about L plus the shift's change, not exactly L.)
    """
    missing = [k for k in (context_key, perturbation_key) if k not in target]
    if missing or len(target) != 2:
        raise DataError(
            f"target must set exactly {context_key!r} and {perturbation_key!r}, got {target}; the baseline "
            "composes one context with one perturbation"
        )
    missing = [k for k in (context_key, perturbation_key) if k not in obs.columns]
    if missing:
        raise DataError(f"obs has no columns {missing}; it has {list(obs.columns)}")
    if obs.shape[0] != counts.shape[0]:
        raise DataError(f"obs has {obs.shape[0]} rows but counts has {counts.shape[0]} cells")
    if n_cells < 1:
        raise DataError(f"n_cells must be >= 1, got {n_cells}")
    context, perturbation = str(target[context_key]), str(target[perturbation_key])
    if perturbation == control_value:
        raise DataError(f"target {target} is the control: there is no perturbation to shift by")
    counts = sp.csr_matrix(counts, dtype=np.float64)
    contexts = obs[context_key].astype(str).to_numpy()
    perturbations = obs[perturbation_key].astype(str).to_numpy()
    is_control = perturbations == control_value

    controls = np.flatnonzero((contexts == context) & is_control)
    if controls.size == 0:
        raise DataError(
            f"no control cells ({perturbation_key}={control_value!r}) with {context_key}={context!r}: the baseline "
            f"starts from them; contexts with control cells: {sorted(set(contexts[is_control].tolist()))}"
        )
    with_perturbation = sorted(set(contexts[perturbations == perturbation].tolist()) - {context})
    if not with_perturbation:
        raise DataError(
            f"{perturbation_key}={perturbation!r} occurs in no {context_key} other than {context!r}, so its "
            "shift cannot be measured anywhere"
        )
    measured = [c for c in with_perturbation if ((contexts == c) & is_control).any()]
    if not measured:
        raise DataError(
            f"{perturbation_key}={perturbation!r} occurs in {context_key} {with_perturbation}, but none of them "
            f"has control cells ({perturbation_key}={control_value!r}) to measure its shift against"
        )
    shifts = [
        _mean_lognorm(counts, np.flatnonzero((contexts == c) & (perturbations == perturbation)))
        - _mean_lognorm(counts, np.flatnonzero((contexts == c) & is_control))
        for c in measured
    ]
    delta = np.mean(shifts, axis=0)  # (G,)

    picked = controls[np.random.default_rng(seed).integers(0, controls.size, n_cells)]  # (n_cells,)
    library = np.asarray(counts[picked].sum(axis=1)).ravel()  # (n_cells,)
    shifted = np.maximum(normalize_log1p(counts[picked], TARGET_SUM) + delta, 0.0)  # (n_cells, G)
    return np.rint(np.expm1(shifted) * library[:, None] / TARGET_SUM).astype(np.int64)
