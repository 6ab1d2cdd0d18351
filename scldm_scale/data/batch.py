"""The `CellBatch` every loader yields, and how a CSR block of cells becomes one.

The batch is the seam between data and model. A cell enters the encoder as a set of gene tokens (padded
per batch, with a boolean mask that is True on real tokens) chosen by a `TokenPolicy`; the decoder target
is the dense count vector over the decoded genes, zeros included. Condition labels enter as integer ids
(`LabelEncoder`). `collate` takes any CSR block; `collate_csr` takes the raw arrays of a canonical one
(`canonical_csr`), so the loaders collate row slices of a block read once without building matrices.

Gene-subset training (`model.decode_genes: N`): a training batch may decode only some columns
(`draw_decode_columns`: the batch's expressed genes, up to half of N, plus uniformly drawn unexpressed
genes up to N); its target and library size are then the counts over those columns only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scldm_scale.data.counts import DataError


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


@dataclass
class CellBatch:
    gene_ids: torch.Tensor  # (B, S) long, expressed genes of each cell, padded
    counts: torch.Tensor  # (B, S) float32, their counts (0 on padding)
    mask: torch.Tensor  # (B, S) bool, True on real tokens
    target: torch.Tensor  # (B, G) float32, counts over the decoded genes
    decode_gene_ids: torch.Tensor  # (G,) long, the genes the decoder predicts
    library_size: torch.Tensor  # (B,) float32, each cell's total counts over the decoded genes
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
    expressed_plus_zeros: the expressed genes plus `n_zero_tokens` genes sampled among the cell's zeros
        (`sample_zero_genes`). The loaders draw them from a generator seeded by the batch's cells (and their
        seed), so a resumed run draws the same; `embed` seeds one per cell, so an embedding never depends on
        the batch.
    """

    mode: str = "expressed"
    n_zero_tokens: int = 0


EXPRESSED_ONLY = TokenPolicy()


def canonical_csr(counts: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """float32 CSR with sorted columns and no stored zeros (what collate_csr expects); copied only when the
    input is not already so, and never modified."""
    counts = sp.csr_matrix(counts, dtype=np.float32)  # no copy when it already is float32 CSR
    if (counts.data == 0).any() or not counts.has_sorted_indices:
        counts = counts.copy()
        counts.eliminate_zeros()  # explicitly stored zeros are not expressed genes
        counts.sort_indices()
    return counts


def sample_zero_genes(expressed: np.ndarray, n_genes: int, n_zero_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """n_zero_tokens distinct columns of [0, n_genes) outside `expressed` (all of them if fewer), ascending."""
    zeros = np.setdiff1d(np.arange(n_genes), expressed, assume_unique=True)
    return np.sort(rng.choice(zeros, size=min(n_zero_tokens, len(zeros)), replace=False))


# At most this share of a decoded subset are the batch's expressed genes; the rest are drawn among the genes
# no cell of the batch expresses. Those zeros are what push a gene's softmax mass down where it is absent:
# were the expressed genes to fill every slot (a whole-transcriptome batch of 256 cells expresses 10k+
# genes), a gene never expressed in a batch would never be decoded and its mass would drift unchecked.
EXPRESSED_SHARE = 0.5


def draw_decode_columns(expressed: np.ndarray, n_columns: int, n_decode: int, rng: np.random.Generator) -> np.ndarray:
    """n_decode distinct columns of [0, n_columns) for a training step to decode, ascending.

    `expressed` (sorted, unique) are the columns with a count in some cell of the batch: all of them are
    kept when they are at most EXPRESSED_SHARE of n_decode (else that many, drawn uniformly among them), and
    the rest are drawn uniformly among the unexpressed columns. n_decode >= n_columns decodes every column.
    """
    if n_decode >= n_columns:
        return np.arange(n_columns)
    unexpressed = np.setdiff1d(np.arange(n_columns), expressed, assume_unique=True)
    cap = int(EXPRESSED_SHARE * n_decode)
    # Above the cap only when the unexpressed columns cannot fill the rest.
    n_expressed = min(len(expressed), max(cap, n_decode - len(unexpressed)))
    kept = expressed if n_expressed == len(expressed) else rng.choice(expressed, size=n_expressed, replace=False)
    drawn = rng.choice(unexpressed, size=n_decode - n_expressed, replace=False)
    return np.sort(np.concatenate([kept, drawn]))


def _token_columns(expressed: np.ndarray, n_genes: int, policy: TokenPolicy, rng: np.random.Generator) -> np.ndarray:
    if policy.mode == "dense":
        return np.arange(n_genes)
    if policy.mode == "expressed_plus_zeros" and policy.n_zero_tokens > 0:
        return np.concatenate([expressed, sample_zero_genes(expressed, n_genes, policy.n_zero_tokens, rng)])
    return expressed


def collate(
    counts: sp.spmatrix | np.ndarray,
    conditions: dict[str, np.ndarray],
    decode_gene_ids: np.ndarray | None = None,
    policy: TokenPolicy = EXPRESSED_ONLY,
    rng: np.random.Generator | None = None,
    decode_columns: np.ndarray | None = None,
) -> CellBatch:
    """Build a CellBatch from a block of cells (rows) over genes (columns).

    Column j is vocabulary gene decode_gene_ids[j] (default: column j is gene j, the full vocabulary).
    The encoder tokens of each cell follow `policy`; the target is the dense row over `decode_columns`
    (sorted; default every column), and the library size the row's sum over them.
    """
    counts = canonical_csr(counts)
    n_genes = counts.shape[1]
    return collate_csr(
        counts.data, counts.indices, counts.indptr, n_genes, conditions, decode_gene_ids, policy, rng, decode_columns
    )


def _scatter(rows: np.ndarray, columns: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    out.ravel()[rows * shape[1] + columns] = values  # 1-D scatter: faster than 2-D fancy indexing
    return out


def _row_sums(rows: np.ndarray, values: np.ndarray, n_rows: int) -> np.ndarray:
    return np.bincount(rows, weights=values, minlength=n_rows).astype(np.float32)


def collate_csr(
    data: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    n_genes: int,
    conditions: dict[str, np.ndarray],
    decode_gene_ids: np.ndarray | None = None,
    policy: TokenPolicy = EXPRESSED_ONLY,
    rng: np.random.Generator | None = None,
    decode_columns: np.ndarray | None = None,
) -> CellBatch:
    """`collate` on the raw arrays of a canonical CSR block (float32 data, sorted columns, no stored zeros);
    the loaders call it on row slices of a block read once, without building scipy matrices."""
    n_cells = len(indptr) - 1
    lengths = np.diff(indptr)
    indptr = indptr - indptr[0]  # a row slice of a larger block starts anywhere
    row_of_entry = np.repeat(np.arange(n_cells), lengths)
    # The dense rows over every column, unless only a subset is decoded and the tokens are the expressed genes.
    needs_dense = decode_columns is None or policy.mode != "expressed"
    dense = _scatter(row_of_entry, indices, data, (n_cells, n_genes)) if needs_dense else None
    if policy.mode == "expressed":
        token_columns, token_values = indices, data
    else:
        rng = rng if rng is not None else np.random.default_rng(0)
        columns = [_token_columns(indices[indptr[i] : indptr[i + 1]], n_genes, policy, rng) for i in range(n_cells)]
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
    if decode_columns is None:
        target, decoded, library_size = dense, column_gene.copy(), _row_sums(row_of_entry, data, n_cells)
    else:
        slot = np.full(n_genes, -1, dtype=np.int64)  # column -> its place in the subset, -1 outside it
        slot[decode_columns] = np.arange(len(decode_columns))
        keep = slot[indices] >= 0
        rows, kept = row_of_entry[keep], data[keep]
        target = _scatter(rows, slot[indices[keep]], kept, (n_cells, len(decode_columns)))  # (B, N)
        decoded = column_gene[decode_columns]  # (N,)
        library_size = _row_sums(rows, kept, n_cells)
    return CellBatch(
        gene_ids=torch.from_numpy(gene_ids),
        counts=torch.from_numpy(values),
        mask=torch.from_numpy(mask),
        target=torch.from_numpy(target),
        decode_gene_ids=torch.from_numpy(decoded),
        library_size=torch.from_numpy(library_size),
        conditions={k: torch.from_numpy(v) for k, v in conditions.items()},
    )
