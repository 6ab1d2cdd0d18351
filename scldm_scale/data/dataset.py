"""An AnnData's cells in memory, and the endless shuffled batch stream over a set of items.

`build_dataset` validates an AnnData of raw counts (the `h5ad` source and the built-in dataset) into a
`CellDataset`: CSR counts over the vocabulary, condition ids and a train / test split (the obs split column,
else `split.stratified_split`); its `batch` collates rows into a `CellBatch`. `ShuffledBatches` turns any
batch function over item indices into the resumable, rank-sharded stream the trainer consumes (cells here,
encoded latents for the prior). The streaming SOMA loader (`soma.py`) is its counterpart for large data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from scldm_scale.config import DataConfig
from scldm_scale.data.batch import EXPRESSED_ONLY, CellBatch, LabelEncoder, TokenPolicy, collate, draw_decode_columns
from scldm_scale.data.counts import DataError, load_builtin, read_counts, validate_counts, validate_labels
from scldm_scale.data.split import stratified_split
from scldm_scale.world import rank_and_world_size

log = logging.getLogger(__name__)


class CellDataset:
    """Counts (CSR, cells x vocabulary), condition ids and split of an in-memory AnnData.

    gene_positions: the vocabulary position of each column when the columns are a subset of a model's
    vocabulary (data that lacks some of its genes); None when column j is gene j.
    """

    def __init__(
        self,
        counts: sp.csr_matrix,
        gene_names: list[str],
        obs: dict[str, np.ndarray],
        encoders: dict[str, LabelEncoder],
        split: np.ndarray,
        policy: TokenPolicy = EXPRESSED_ONLY,
        gene_positions: np.ndarray | None = None,
    ):
        self.policy = policy
        self.gene_positions = gene_positions
        self.counts = counts
        self.gene_names = gene_names
        self.obs = obs
        self.encoders = encoders
        self.split = split
        self.condition_ids = {k: enc.encode(obs[k]) for k, enc in encoders.items()}

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]

    def indices(self, split: str) -> np.ndarray:
        idx = np.flatnonzero(self.split == split)
        if idx.size == 0:
            raise DataError(f"the {split!r} split is empty")
        return idx

    def batch(self, idx: np.ndarray, decode_genes: int | None = None, draw_key: tuple[int, ...] = ()) -> CellBatch:
        """The rows `idx` as a CellBatch decoding every gene, or (training with decode_genes = N) a subset of N
        genes drawn from (draw_key, idx): the same batch of the same stream position draws the same."""
        rows = self.counts[idx]
        rng = np.random.default_rng(idx) if self.policy.mode == "expressed_plus_zeros" else None
        conditions = {k: v[idx] for k, v in self.condition_ids.items()}
        columns = None
        if decode_genes is not None:
            draw = np.random.default_rng([*draw_key, *idx.tolist()])
            columns = draw_decode_columns(np.unique(rows.indices), self.n_genes, decode_genes, draw)
        return collate(rows, conditions, self.gene_positions, self.policy, rng, decode_columns=columns)

    def library_sizes(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.counts[idx].sum(axis=1)).ravel()


def build_dataset(
    adata: ad.AnnData, cfg: DataConfig, encoders: dict[str, LabelEncoder] | None = None, where: str = "data"
) -> CellDataset:
    """Validate an AnnData of counts and turn it into a CellDataset (fitting encoders unless given)."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(f"{where}: empty dataset ({adata.n_obs} cells x {adata.n_vars} genes)")
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique().tolist()[:5]
        raise DataError(f"{where}: duplicate gene ids in var_names, e.g. {dup}; make them unique first")
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    validate_counts(counts, where, cfg.allow_non_integer)
    counts.eliminate_zeros()
    empty = np.flatnonzero(np.diff(counts.indptr) == 0)
    if empty.size:
        raise DataError(
            f"{where}: {empty.size} cells have zero counts (first: {adata.obs_names[empty[0]]}); "
            "remove them, e.g. sc.pp.filter_cells(adata, min_counts=1)"
        )
    missing = [k for k in cfg.condition_keys if k not in adata.obs]
    if missing:
        raise DataError(f"{where}: condition keys {missing} are not obs columns; obs has {list(adata.obs)}")
    validate_labels(adata.obs, cfg.condition_keys, where)
    obs = {k: adata.obs[k].astype(str).to_numpy() for k in cfg.condition_keys}
    if encoders is None:
        encoders = {k: LabelEncoder.fit(k, obs[k]) for k in cfg.condition_keys}
    if cfg.split_key in adata.obs:
        split = adata.obs[cfg.split_key].astype(str).to_numpy()
        unknown = sorted(set(split.tolist()) - {"train", "test"})
        if unknown:
            raise DataError(f"{where}: obs[{cfg.split_key!r}] has values {unknown}; expected train/test")
    else:
        strata = obs[cfg.condition_keys[0]] if cfg.condition_keys else np.zeros(adata.n_obs, dtype=str)
        split = stratified_split(strata, cfg.test_fraction, cfg.split_seed)
    policy = TokenPolicy(cfg.gene_tokens, cfg.n_zero_tokens)
    return CellDataset(counts, adata.var_names.tolist(), obs, encoders, split, policy)


def load_anndata(cfg: DataConfig) -> ad.AnnData:
    if cfg.path is None:
        return load_builtin(cfg.builtin)
    return read_counts(cfg.path, cfg.layer)


class ShuffledBatches:
    """Endless shuffled batches over a set of items; epoch e uses the permutation from (seed, e).

    With several ranks, each step takes a global batch of batch_size x world_size items from the
    permutation and rank r builds its slice r, so the global batches, the steps per epoch and the state
    do not depend on the number of ranks (a run resumes exactly on another number). `batch_fn(sorted
    indices, epoch)` builds a batch (the epoch keys any random draw of it, so a batch that recurs in
    another epoch draws anew, and a resumed run draws the same). The last incomplete global batch of
    each epoch is dropped (fixed shapes, equal steps on every rank); a set smaller than one global batch
    gives smaller batches.
    With `weights` (one per item, not all zero), an epoch is len(idx) draws with replacement, item i with
    probability weights[i] / sum(weights), from the same (seed, epoch) generator: ranks, steps and resume
    behave as without.
    rank / world_size default to this process's (`scldm_scale.world`).
    """

    def __init__(
        self,
        batch_fn: Callable[[np.ndarray], Any],
        idx: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
        weights: np.ndarray | None = None,
    ):
        self.batch_fn = batch_fn
        self.idx = np.asarray(idx)
        self.p = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != self.idx.shape or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"weights must be {len(self.idx)} finite values >= 0, not all zero")
            self.p = w / w.sum()
        self.rank, self.world_size = rank_and_world_size(rank, world_size)
        if len(self.idx) < self.world_size:
            raise DataError(f"{len(self.idx)} items cannot be shared among {self.world_size} ranks")
        self.batch_size = min(batch_size, len(self.idx) // self.world_size)
        if self.batch_size < batch_size:
            log.warning("batch size %d > %d items per rank; using %d", batch_size, len(self.idx), self.batch_size)
        self.seed = seed
        self.epoch = 0
        self.position = 0  # items of the epoch's permutation consumed by all ranks together

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        step = self.batch_size * self.world_size
        if self.position + step > len(self.idx):
            self.epoch += 1
            self.position = 0
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.idx)
        order = rng.permutation(n) if self.p is None else rng.choice(n, n, p=self.p)
        start = self.position + self.rank * self.batch_size
        chunk = self.idx[np.sort(order[start : start + self.batch_size])]
        self.position += step
        return self.batch_fn(chunk, self.epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
