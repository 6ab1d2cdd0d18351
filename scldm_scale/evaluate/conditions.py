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
    """(condition, real rows, generated rows) over the combinations both sides have cells of.

    Cells of a combination that only one side has take part in no group, "all" included, so every
    group compares like with like.
    """
    keys = list(real.columns)
    real_combo, gen_combo = combination_labels(real), combination_labels(gen)
    shared = np.intersect1d(real_combo.astype(str), gen_combo.astype(str))
    real_in, gen_in = np.isin(real_combo, shared), np.isin(gen_combo, shared)
    yield "all", real_in, gen_in
    for key in keys:
        for value in np.unique(gen[key].to_numpy()[gen_in]):
            yield f"{key}={value}", real_in & (real[key].to_numpy() == value), gen_in & (gen[key].to_numpy() == value)
    if len(keys) > 1:
        for combo in shared:
            yield combo, real_combo == combo, gen_combo == combo
    if holdout:
        real_unseen, gen_unseen = holdout_mask(real, holdout), holdout_mask(gen, holdout)
        yield "unseen", real_in & real_unseen, gen_in & gen_unseen
        yield "seen", real_in & ~real_unseen, gen_in & ~gen_unseen


def unmatched(real: pd.DataFrame, gen: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(combinations only the real cells have, combinations only the generated cells have)."""
    real_combo, gen_combo = set(combination_labels(real)), set(combination_labels(gen))
    return sorted(real_combo - gen_combo), sorted(gen_combo - real_combo)
