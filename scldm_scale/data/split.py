"""The train / val / test split of cells, stratified by a label.

Within every label value the cells are permuted by the seed and the first round(test_fraction x n) go to
test, the next round(val_fraction x n) to val, the rest to train; each value keeps at least one train cell.
`prepare` writes the three-way split into the experiment; an in-memory dataset without a split column and
`classify` make a train / test one (val_fraction 0) the same way.
"""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int, val_fraction: float = 0.0) -> np.ndarray:
    """(N,) object array of 'train' / 'val' / 'test', the same fractions within every label value."""
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "train", dtype=object)
    for value in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == value)
        idx = idx[rng.permutation(len(idx))]
        n_test = min(int(round(test_fraction * len(idx))), len(idx) - 1)
        n_val = min(int(round(val_fraction * len(idx))), len(idx) - 1 - n_test)
        split[idx[:n_test]] = "test"
        split[idx[n_test : n_test + n_val]] = "val"
    return split
