"""Condition combinations held out of training (`data.holdout_combinations`), for every data source.

A combination is a mapping {condition key: value}; a cell matches it when every one of its pairs holds,
and is held out when it matches any combination. Labels compare as strings, as everywhere in the data
layer. In memory the held-out cells are a row mask (`holdout_mask`, which evaluation reuses to find the
cells of an unseen combination); from SOMA they are never read, because the obs value filter excludes
them (`exclusion_filter`). Either way `check_holdout` then refuses a combination that matches no cell
and a held-out value that no training cell keeps (the model would have no embedding for it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from scldm_scale.data.counts import DataError

log = logging.getLogger(__name__)


def describe(combination: Mapping[str, str]) -> str:
    """'cell_line=line_B, perturbation=pert_2'."""
    return ", ".join(f"{k}={v}" for k, v in combination.items())


def combination_mask(obs: pd.DataFrame, combination: Mapping[str, str]) -> np.ndarray:
    """(N,) bool, True on the cells matching every key: value pair of the combination."""
    missing = [k for k in combination if k not in obs.columns]
    if missing:
        raise DataError(
            f"held-out combination {{{describe(combination)}}}: keys {missing} are not obs columns; "
            f"obs has {list(obs.columns)}"
        )
    match = np.ones(len(obs), dtype=bool)
    for key, value in combination.items():
        match &= obs[key].astype(str).to_numpy() == str(value)
    return match


def holdout_mask(obs: pd.DataFrame, combinations: Sequence[Mapping[str, str]]) -> np.ndarray:
    """(N,) bool, True on the cells of obs that match any of the combinations (the held-out cells)."""
    mask = np.zeros(len(obs), dtype=bool)
    for combination in combinations:
        mask |= combination_mask(obs, combination)
    return mask


def _column(key: str) -> str:
    # A column whose name is not a Python identifier must be quoted as attr('...') in a SOMA value filter.
    return key if key.isidentifier() else f"attr({key!r})"


def match_filter(combinations: Sequence[Mapping[str, str]]) -> str:
    """SOMA obs value filter selecting the cells that match any of the combinations."""
    clauses = [" and ".join(f"{_column(k)} == {str(v)!r}" for k, v in c.items()) for c in combinations]
    return " or ".join(f"({clause})" for clause in clauses)


def exclusion_filter(combinations: Sequence[Mapping[str, str]]) -> str | None:
    """SOMA obs value filter keeping the cells that match none of the combinations (None: keep all)."""
    if not combinations:
        return None
    # not (a == x and b == y), spelled with != so that it needs no `not` in the filter grammar.
    clauses = [" or ".join(f"{_column(k)} != {str(v)!r}" for k, v in c.items()) for c in combinations]
    return " and ".join(f"({clause})" for clause in clauses)


def check_holdout(
    combinations: Sequence[Mapping[str, str]],
    obs: pd.DataFrame,
    in_train_split: np.ndarray,
    train_labels: Mapping[str, np.ndarray],
    where: str,
) -> None:
    """Refuse combinations that match nothing and held-out values unknown to training; log what is held out.

    obs: labels of the data's cells in any split (at least all the cells matching a combination);
    in_train_split: (len(obs),) bool, the cells of the train split; train_labels: key -> labels of the
    training cells that remain once the held-out cells are removed.
    """
    matches = [combination_mask(obs, c) for c in combinations]
    for combination, match in zip(combinations, matches, strict=True):
        if not match.any():
            raise DataError(
                f"{where}: held-out combination {{{describe(combination)}}} matches no cell; check the values "
                "against the data's labels (data.holdout_combinations)"
            )
    for combination in combinations:
        for key, value in combination.items():
            if not (np.asarray(train_labels[key]) == str(value)).any():
                raise DataError(
                    f"{where}: with data.holdout_combinations applied, no training cell has {key}={value!r}, so "
                    f"that value would be unknown to the model; hold out fewer combinations with {key}={value!r}, "
                    "so that it still occurs in training with other conditions"
                )
    for combination, match in zip(combinations, matches, strict=True):
        n_train, n_all = int((match & in_train_split).sum()), int(match.sum())
        log.info("holding out {%s}: %d training cells (%d in all splits)", describe(combination), n_train, n_all)
    held_out = np.logical_or.reduce(matches) & in_train_split
    log.info("held out %d training cells in all", int(held_out.sum()))
