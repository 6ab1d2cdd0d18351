"""An in-memory cell dataset, its label encoders and split, and the `CellBatch` every loader yields.

The batch is the seam between data and model: the streaming SOMA/Census loader of a later issue yields
the same `CellBatch`. A cell enters the encoder as the set of its expressed genes (padded per batch,
with a boolean mask that is True on real tokens), and the decoder target is the dense count vector over
the whole gene vocabulary, zeros included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from scldm_scale.config import DataConfig
from scldm_scale.data.counts import DataError, load_builtin, read_counts, validate_counts

log = logging.getLogger(__name__)


class LabelEncoder:
    """Condition values <-> integer ids; id len(values) is the NULL (dropped) token."""

    def __init__(self, key: str, values: list[str]):
        self.key = key
        self.values = list(values)
        self._index = {v: i for i, v in enumerate(self.values)}

    @classmethod
    def fit(cls, key: str, labels: np.ndarray) -> LabelEncoder:
        return cls(key, sorted({str(v) for v in labels}))

    @property
    def null_id(self) -> int:
        return len(self.values)

    def encode(self, labels: np.ndarray | list[str]) -> np.ndarray:
        out = np.empty(len(labels), dtype=np.int64)
        for i, v in enumerate(labels):
            idx = self._index.get(str(v))
            if idx is None:
                raise DataError(
                    f"condition {self.key}={v!r} is not known to this model; known values: {', '.join(self.values)}"
                )
            out[i] = idx
        return out

    def state_dict(self) -> dict:
        return {"key": self.key, "values": self.values}

    @classmethod
    def from_state(cls, state: dict) -> LabelEncoder:
        return cls(state["key"], state["values"])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """'train'/'test' per cell, the same fraction of every label in test (at least one train cell each)."""
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "train", dtype=object)
    for value in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == value)
        idx = idx[rng.permutation(len(idx))]
        n_test = min(int(round(test_fraction * len(idx))), len(idx) - 1)
        split[idx[:n_test]] = "test"
    return split


@dataclass
class CellBatch:
    gene_ids: torch.Tensor  # (B, S) long, expressed genes of each cell, padded
    counts: torch.Tensor  # (B, S) float32, their counts (0 on padding)
    mask: torch.Tensor  # (B, S) bool, True on real tokens
    target: torch.Tensor  # (B, G) float32, counts over the decoded genes
    decode_gene_ids: torch.Tensor  # (G,) long, the genes the decoder predicts
    library_size: torch.Tensor  # (B,) float32, total counts of each cell
    conditions: dict[str, torch.Tensor]  # key -> (B,) long label ids

    def to(self, device: torch.device | str) -> CellBatch:
        return CellBatch(
            gene_ids=self.gene_ids.to(device, non_blocking=True),
            counts=self.counts.to(device, non_blocking=True),
            mask=self.mask.to(device, non_blocking=True),
            target=self.target.to(device, non_blocking=True),
            decode_gene_ids=self.decode_gene_ids.to(device, non_blocking=True),
            library_size=self.library_size.to(device, non_blocking=True),
            conditions={k: v.to(device, non_blocking=True) for k, v in self.conditions.items()},
        )

    def pin_memory(self) -> CellBatch:
        """Called by DataLoader(pin_memory=True) so host-to-GPU copies can be asynchronous."""
        return CellBatch(
            gene_ids=self.gene_ids.pin_memory(),
            counts=self.counts.pin_memory(),
            mask=self.mask.pin_memory(),
            target=self.target.pin_memory(),
            decode_gene_ids=self.decode_gene_ids.pin_memory(),
            library_size=self.library_size.pin_memory(),
            conditions={k: v.pin_memory() for k, v in self.conditions.items()},
        )

    @property
    def size(self) -> int:
        return self.target.shape[0]


@dataclass(frozen=True)
class TokenPolicy:
    """Which genes of a cell the encoder sees.

    expressed: only the expressed genes (the default; padded per batch with a mask).
    dense: every gene of the vocabulary, zeros included.
    expressed_plus_zeros: the expressed genes plus `n_zero_tokens` genes sampled among the cell's zeros,
        drawn from a generator seeded by the batch's cells (and the loader's seed/epoch), so reproducible.
    """

    mode: str = "expressed"
    n_zero_tokens: int = 0


EXPRESSED_ONLY = TokenPolicy()


def _tokens_of_row(indices: np.ndarray, n_genes: int, policy: TokenPolicy, rng) -> np.ndarray:
    if policy.mode == "dense":
        return np.arange(n_genes)
    if policy.mode == "expressed_plus_zeros" and policy.n_zero_tokens > 0:
        zeros = np.setdiff1d(np.arange(n_genes), indices, assume_unique=True)
        picked = rng.choice(zeros, size=min(policy.n_zero_tokens, len(zeros)), replace=False)
        return np.concatenate([indices, np.sort(picked)])
    return indices


def collate(
    counts: sp.csr_matrix,
    conditions: dict[str, np.ndarray],
    decode_gene_ids: np.ndarray | None = None,
    policy: TokenPolicy = EXPRESSED_ONLY,
    rng: np.random.Generator | None = None,
) -> CellBatch:
    """Build a CellBatch from a CSR block of cells (rows) over genes (columns).

    Column j is vocabulary gene decode_gene_ids[j] (default: column j is gene j, the full vocabulary).
    The encoder tokens of each cell follow `policy`; the target is always the dense row.
    """
    counts = sp.csr_matrix(counts, dtype=np.float32)  # no copy when it already is float32 CSR
    if (counts.data == 0).any() or not counts.has_sorted_indices:
        counts = counts.copy()
        counts.eliminate_zeros()  # explicitly stored zeros are not expressed genes
        counts.sort_indices()
    n_genes = counts.shape[1]
    return collate_csr(counts.data, counts.indices, counts.indptr, n_genes, conditions, decode_gene_ids, policy, rng)


def collate_csr(
    data: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    n_genes: int,
    conditions: dict[str, np.ndarray],
    decode_gene_ids: np.ndarray | None = None,
    policy: TokenPolicy = EXPRESSED_ONLY,
    rng: np.random.Generator | None = None,
) -> CellBatch:
    """`collate` on the raw arrays of a canonical CSR block (float32 data, sorted columns, no stored zeros);
    the loaders call it on row slices of a block read once, without building scipy matrices."""
    n_cells = len(indptr) - 1
    lengths = np.diff(indptr)
    indptr = indptr - indptr[0]  # a row slice of a larger block starts anywhere
    row_of_entry = np.repeat(np.arange(n_cells), lengths)
    dense = np.zeros((n_cells, n_genes), dtype=np.float32)
    dense.ravel()[row_of_entry * n_genes + indices] = data  # 1-D scatter: faster than 2-D fancy indexing
    if policy.mode == "expressed":
        token_columns, token_values = indices, data
    else:
        rng = rng if rng is not None else np.random.default_rng(0)
        columns = [_tokens_of_row(indices[indptr[i] : indptr[i + 1]], n_genes, policy, rng) for i in range(n_cells)]
        lengths = np.array([len(c) for c in columns], dtype=np.int64)
        token_columns = np.concatenate(columns) if n_cells else np.zeros(0, dtype=np.int64)
        token_values = dense[np.repeat(np.arange(n_cells), lengths), token_columns]
    seq_len = max(int(lengths.max(initial=0)), 1)
    # Row-major boolean assignment fills each row's first lengths[i] slots, in CSR order.
    mask = np.arange(seq_len) < lengths[:, None]
    column_gene = np.arange(n_genes) if decode_gene_ids is None else np.asarray(decode_gene_ids, dtype=np.int64)
    gene_ids = np.zeros((n_cells, seq_len), dtype=np.int64)
    values = np.zeros((n_cells, seq_len), dtype=np.float32)
    gene_ids[mask] = column_gene[token_columns]
    values[mask] = token_values
    library_size = np.bincount(row_of_entry, weights=data, minlength=n_cells).astype(np.float32)
    return CellBatch(
        gene_ids=torch.from_numpy(gene_ids),
        counts=torch.from_numpy(values),
        mask=torch.from_numpy(mask),
        target=torch.from_numpy(dense),
        decode_gene_ids=torch.from_numpy(column_gene.copy()),
        library_size=torch.from_numpy(library_size),
        conditions={k: torch.from_numpy(v) for k, v in conditions.items()},
    )


class CellDataset:
    """Counts (CSR, cells x vocabulary), condition ids and split of an in-memory AnnData."""

    def __init__(
        self,
        counts: sp.csr_matrix,
        gene_names: list[str],
        obs: dict[str, np.ndarray],
        encoders: dict[str, LabelEncoder],
        split: np.ndarray,
        policy: TokenPolicy = EXPRESSED_ONLY,
    ):
        self.policy = policy
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

    def batch(self, idx: np.ndarray) -> CellBatch:
        rng = np.random.default_rng(idx) if self.policy.mode == "expressed_plus_zeros" else None
        conditions = {k: v[idx] for k, v in self.condition_ids.items()}
        return collate(self.counts[idx], conditions, policy=self.policy, rng=rng)

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
    indices)` builds a batch. The last incomplete global batch of each epoch is dropped (fixed shapes,
    equal steps on every rank); a set smaller than one global batch gives smaller batches.
    rank / world_size default to torch.distributed's, else RANK / WORLD_SIZE, else 0 / 1.
    """

    def __init__(
        self,
        batch_fn: Callable[[np.ndarray], Any],
        idx: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        from scldm_scale.data.soma import _rank_and_world

        self.batch_fn = batch_fn
        self.idx = np.asarray(idx)
        self.rank, self.world_size = _rank_and_world(rank, world_size)
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
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.idx))
        start = self.position + self.rank * self.batch_size
        chunk = self.idx[np.sort(order[start : start + self.batch_size])]
        self.position += step
        return self.batch_fn(chunk)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
