"""Conditions of a cell set: names for values and combinations, and the groups metrics are taken over."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from scldm_scale.data.holdout import describe, holdout_mask


def combination_labels(labels: pd.DataFrame) -> np.ndarray:
    """One string per cell naming its full combination of condition values."""
    keys = list(labels.columns)
    if not keys:
        return np.full(len(labels), "all", dtype=object)
    rows = labels.itertuples(index=False)
    return np.array([describe(dict(zip(keys, row, strict=True))) for row in rows], dtype=object)


def groups(
    real: pd.DataFrame, gen: pd.DataFrame, holdout: Sequence[Mapping[str, str]] = ()
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(condition, real rows, generated rows) for every condition both sides have cells of."""
    keys = list(real.columns)
    real_combo, gen_combo = combination_labels(real), combination_labels(gen)
    covered = np.isin(real_combo, np.unique(gen_combo))
    yield "all", covered, np.ones(len(gen), bool)
    for key in keys:
        for value in np.unique(gen[key]):
            yield f"{key}={value}", covered & (real[key].to_numpy() == value), gen[key].to_numpy() == value
    if len(keys) > 1:
        for combo in np.unique(gen_combo):
            yield combo, real_combo == combo, gen_combo == combo
    if holdout:
        real_unseen, gen_unseen = holdout_mask(real, holdout), holdout_mask(gen, holdout)
        yield "unseen", real_unseen, gen_unseen
        yield "seen", covered & ~real_unseen, ~gen_unseen
