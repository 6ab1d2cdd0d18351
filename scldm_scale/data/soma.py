"""Streaming cells from a TileDB-SOMA experiment (a local one, or the CELLxGENE Census).

Shuffling is scatter-gather, and the global order is a function of (seed, epoch) alone:
1. the split's cells (sorted soma_joinids) are cut into contiguous chunks of `chunk_size` cells;
2. the chunk order is permuted by (seed, epoch);
3. consecutive shuffled chunks form buffers of `buffer_chunks` chunks; a buffer's cells are permuted by
   (seed, epoch, buffer) and cut into batches (its last incomplete batch is dropped, so no batch straddles
   two buffers). The epoch's batches, buffer after buffer, are its global order: the "units";
4. the ranks split the units into equal contiguous ranges (rank r gets units [r*T, (r+1)*T), T = units //
   world_size, the few left over are dropped), so every rank does the same number of steps (DDP never
   waits at an epoch's end) and reads whole buffers but for the two at its range's ends. The buffers are
   drawn from all over the experiment, and each epoch deals other cells to each rank (tiledbsoma-ml 0.1.0
   instead gives each rank one fixed contiguous block, in the same order every epoch);
5. a rank reads its buffers in groups of n x k (n its number of DataLoader workers, 1 without; k =
   `group_buffers`, 1 by default): worker w reads the group's cells in the w-th of n contiguous ranges of cell
   positions (equal shares), as k TileDB reads of about one buffer each (its range cut in k), the next group
   in a background thread while it hands out the current one. A read of cells scattered over an experiment costs
   the tiles it touches, and on the Census layout (tiles of 2,048 genes by hundreds of cells) chunks
   scattered over the whole experiment touch nearly all of them: split by range, the n workers decompress
   each tile once instead of n times (reading whole buffers each), and a worker's read costs about 1/n of
   one over the whole range (measured on 200,000 x 36,000: 16,384 cells from all of it 9 s of CPU, from half
   5.4 s, from a quarter 3 s). With k > 1 a group covers k times the cells and each read a range k times
   narrower, so a read still costs about its range's tiles: the CPU per cell falls about k-fold while a group
   holds a sizeable share of the experiment (a few hundred thousand cells; on the full Census a group's
   scattered chunks rarely share a tile and k changes little), at the memory of k buffers' CSR rows (plus k
   more being read) per worker instead of one; a TileDB read stays about one buffer. Every worker sends its
   part of every batch as CSR rows (~1.5 MB for 128 cells at ~1.5k expressed genes, where the dense (cells,
   genes) target at 36,000 genes is 18 MB, whose pages cost more than its collation); the DataLoader takes
   them in turn, and the consumer joins the parts and collates. The stream does not depend on the number of
   workers.

The state (epoch, batches consumed, seed, ranks, the units left when the epoch's current rank layout
began) resumes the stream exactly, with any number of workers and with another number of ranks: the
units the old ranks had not consumed are split anew among the new ranks, in global order.
"""

from __future__ import annotations

import functools
import itertools
import logging
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scldm_scale.data.batch import (
    EXPRESSED_ONLY,
    CellBatch,
    LabelEncoder,
    TokenPolicy,
    collate_csr,
    draw_decode_columns,
)
from scldm_scale.data.counts import DataError
from scldm_scale.data.vocab import GeneVocabulary, align_genes
from scldm_scale.world import rank_and_world_size

MEASUREMENT = "RNA"
# TileDB's defaults undo glibc's reuse of freed memory in the training process (host_memory.py): every query and
# context it destroys calls malloc_trim, and its read buffers (1 GiB per column), freed at the heap's top, pass any
# trim threshold, so the training step then faults in all its pages again: 22,000 page faults per step of the
# built-in quickstart's VAE over SOMA against none over the same cells in memory. 256 MiB per column still reads
# 16,384 Census cells at once. DataLoader workers run no step: they keep TileDB's trims (without, the two workers
# of the 200k x 36k loader benchmark held 9.4 GB instead of 5.9).
TILEDB_CONFIG = {"soma.init_buffer_bytes": str(256 << 20)}
TRAINING_PROCESS_CONFIG = {"sm.mem.malloc_trim": "false"}
log = logging.getLogger(__name__)


@dataclass
class SomaSpec:
    """Where the cells are and which of them to read (picklable: sent to DataLoader workers)."""

    uri: str
    layer: str = "counts"
    measurement: str = MEASUREMENT
    obs_filter: str | None = None
    var_filter: str | None = None
    census: bool = False  # open with cellxgene_census.open_soma(uri=...) instead of tiledbsoma.open
    census_version: str = "stable"  # used when census is true and uri is empty (the hosted Census)
    organism: str = "homo_sapiens"  # the Census experiment (census_data/<organism>)
    condition_keys: list[str] = field(default_factory=list)


def tiledb_config() -> dict[str, str]:
    """TileDB's settings for reads in this process: TILEDB_CONFIG, and no malloc_trim outside DataLoader workers."""
    return TILEDB_CONFIG | ({} if get_worker_info() is not None else TRAINING_PROCESS_CONFIG)


@functools.cache
def soma_context():
    """This process's TileDB context for reading; one per process, sharing TileDB's caches."""
    import tiledbsoma

    return tiledbsoma.SOMATileDBContext(tiledb_config=tiledb_config())


def open_experiment(spec: SomaSpec):
    """The Experiment to read: a SOMA experiment, or the `homo_sapiens`-style one inside a Census."""
    if spec.census:
        import cellxgene_census

        try:
            if spec.uri:
                census = cellxgene_census.open_soma(uri=spec.uri, tiledb_config=tiledb_config())
            else:
                census = cellxgene_census.open_soma(census_version=spec.census_version, tiledb_config=tiledb_config())
        except Exception as err:  # network errors, missing collections, ...
            where = spec.uri or f"census_version={spec.census_version}"
            raise DataError(f"cannot open the Census at {where}: {err}") from None
        data = census["census_data"]
        if spec.organism not in data:
            census.close()
            raise DataError(f"census {spec.uri}: no organism {spec.organism!r}; it has {list(data)}")
        return census, data[spec.organism]
    import tiledbsoma

    try:
        exp = tiledbsoma.Experiment.open(spec.uri, context=soma_context())
    except Exception as err:  # tiledbsoma raises DoesNotExistError, SOMAError, ...
        raise DataError(
            f"cannot open SOMA experiment {spec.uri}: {err}; create one with `scldm-scale prepare`"
        ) from None
    return exp, exp


class SomaCells:
    """The cells of an experiment that pass `obs_filter`, read as CSR rows over a gene vocabulary.

    The vocabulary is the experiment's genes (var feature_id, with feature_name where var has it), or the
    `vocabulary` given (a trained model's genes), to which the experiment's genes are matched (`data.vocab`:
    by feature_id, else by feature_name): its genes outside the vocabulary are ignored, and `decode_gene_ids`
    lists the vocabulary positions present in the experiment, so a model reads an experiment whose genes
    are another subset or order. `alignment` says which genes are missing or extra.
    """

    def __init__(self, spec: SomaSpec, vocabulary: GeneVocabulary | list[str] | None = None):
        self.spec = spec
        handle, exp = open_experiment(spec)
        try:
            if spec.measurement not in exp.ms:
                raise DataError(f"{spec.uri}: no measurement {spec.measurement!r}; it has {list(exp.ms)}")
            ms = exp.ms[spec.measurement]
            if spec.layer not in ms.X:
                raise DataError(f"{spec.uri}: no X layer {spec.layer!r}; layers are {list(ms.X)}")
            obs_columns = ["soma_joinid", *spec.condition_keys]
            schema_names = set(exp.obs.schema.names)
            missing = [k for k in spec.condition_keys if k not in schema_names]
            if missing:
                raise DataError(f"{spec.uri}: condition keys {missing} are not obs columns")
            # Total counts per cell: our `prepare` writes n_counts, the Census has raw_sum.
            total_column = next((c for c in ("n_counts", "raw_sum") if c in schema_names), None)
            if total_column:
                obs_columns.append(total_column)
            obs = exp.obs.read(value_filter=spec.obs_filter, column_names=obs_columns).concat().to_pandas()
            var_columns = ["soma_joinid", "feature_id"]
            if "feature_name" in ms.var.schema.names:
                var_columns.append("feature_name")
            var = ms.var.read(value_filter=spec.var_filter, column_names=var_columns).concat().to_pandas()
        finally:
            handle.close()
        if len(obs) == 0:
            raise DataError(f"{spec.uri}: no cells match obs_filter={spec.obs_filter!r}")
        if len(var) == 0:
            raise DataError(f"{spec.uri}: no genes match var_filter={spec.var_filter!r}")
        obs = obs.sort_values("soma_joinid")
        self.joinids = obs["soma_joinid"].to_numpy(dtype=np.int64)
        self.labels = {k: obs[k].astype(str).to_numpy() for k in spec.condition_keys}
        self.n_counts = obs[total_column].to_numpy(dtype=np.float64) if total_column else None
        feature_ids = var["feature_id"].astype(str).to_numpy()
        feature_names = var["feature_name"].astype(str).to_numpy() if "feature_name" in var else None
        if vocabulary is None:
            vocabulary = GeneVocabulary(feature_ids, feature_names)
        self.vocabulary = GeneVocabulary.of(vocabulary)
        self.alignment = align_genes(feature_ids, self.vocabulary, feature_names, where=spec.uri)
        # Columns of the CSR blocks = the experiment's genes that are in the vocabulary, in vocabulary order.
        self.decode_gene_ids = self.alignment.positions  # (G_present,) vocabulary positions
        var_joinids = var["soma_joinid"].to_numpy(dtype=np.int64)[self.alignment.columns]
        self._column_of_var = np.full(int(var["soma_joinid"].max()) + 1, -1, dtype=np.int64)
        self._column_of_var[var_joinids] = np.arange(len(var_joinids))
        self._exp = self._handle = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        # An open handle does not cross processes; each worker opens its own.
        state["_exp"] = state["_handle"] = None
        return state

    def __len__(self) -> int:
        return len(self.joinids)

    def read(self, positions: np.ndarray) -> sp.csr_matrix:
        """CSR counts (len(positions), G_present) of the cells at these positions (sorted ascending)."""
        if self._exp is None:
            self._handle, self._exp = open_experiment(self.spec)
        joinids = self.joinids[positions]
        x = self._exp.ms[self.spec.measurement].X[self.spec.layer]
        # result_order="auto": asking TileDB for row-major order makes the read ~4x slower.
        table = x.read(coords=(joinids,)).tables().concat()
        # Views of the Arrow columns (no copies): the kernel writes the block's arrays and nothing else.
        indptr, indices, data, canonical = _csr_from_triples(
            table["soma_dim_0"].to_numpy(),
            table["soma_dim_1"].to_numpy(),
            table["soma_data"].to_numpy(),
            joinids,
            self._column_of_var,
        )
        block = sp.csr_matrix((data, indices, indptr), shape=(len(positions), len(self.decode_gene_ids)))
        if not canonical:  # a row's columns out of order or repeated: sort them and sum repeats
            block.sum_duplicates()
        return block


@numba.njit(cache=True, nogil=True)
def _csr_from_triples(read_joinids, var_ids, values, joinids, column_of_var):
    """A read's (soma_dim_0, soma_dim_1, soma_data) triples, in any order, as CSR arrays: rows = the sorted
    `joinids`, columns = column_of_var[var joinid] (-1: not in the vocabulary, dropped), zeros dropped, float32.

    Two passes (count per row, then scatter) writing only the block's own arrays: on this VM fresh pages cost
    more than the arithmetic, and the numpy/scipy route (row lookup, int32 index copies, COO -> CSR) wrote
    ~3x the memory, ~2-4 s of CPU per 16,384-cell Census read against ~0.3 s here. canonical: every row's
    columns strictly increase (TileDB's order within a row follows the gene tiles, so they do). The two passes
    spell out the same filter and row lookup on purpose: as inlined njit helpers they ran 1.8x slower (24M
    entries: 1.5 s vs 0.8 s).
    """
    n_rows, n_var = len(joinids), len(column_of_var)
    first = joinids[0] if n_rows else 0
    span = joinids[-1] - first + 1 if n_rows else 0
    dense = span <= 16 * n_rows  # a lookup table over the joinid range, else binary search (a sparse filter)
    row_of = np.full(span if dense else 0, -1, dtype=np.int64)
    if dense:
        for r in range(n_rows):
            row_of[joinids[r] - first] = r
    counts = np.zeros(n_rows + 1, dtype=np.int64)
    for i in range(len(values)):
        g = var_ids[i]
        if values[i] == 0 or g < 0 or g >= n_var or column_of_var[g] < 0:
            continue
        counts[(row_of[read_joinids[i] - first] if dense else np.searchsorted(joinids, read_joinids[i])) + 1] += 1
    indptr = np.cumsum(counts)
    fill = indptr[:-1].copy()
    indices = np.empty(indptr[-1], dtype=np.int32)
    data = np.empty(indptr[-1], dtype=np.float32)
    for i in range(len(values)):
        g = var_ids[i]
        if values[i] == 0 or g < 0 or g >= n_var or column_of_var[g] < 0:
            continue
        r = row_of[read_joinids[i] - first] if dense else np.searchsorted(joinids, read_joinids[i])
        k = fill[r]
        indices[k] = column_of_var[g]
        data[k] = values[i]
        fill[r] = k + 1
    canonical = True
    for r in range(n_rows):
        for k in range(indptr[r] + 1, indptr[r + 1]):
            if indices[k] <= indices[k - 1]:
                canonical = False
    return indptr, indices, data, canonical


def read_anndata(spec: SomaSpec):
    """The cells passing spec.obs_filter as an in-memory AnnData (X = counts, var index = feature_id).

    For evaluation-sized subsets (a test split), not for training data.
    """

    handle, exp = open_experiment(spec)
    try:
        query = exp.axis_query(
            spec.measurement,
            obs_query=_axis_query(spec.obs_filter),
            var_query=_axis_query(spec.var_filter),
        )
        adata = query.to_anndata(X_name=spec.layer)
    finally:
        handle.close()
    adata.var_names = adata.var["feature_id"].astype(str).to_numpy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def _axis_query(value_filter: str | None):
    import tiledbsoma

    return tiledbsoma.AxisQuery(value_filter=value_filter) if value_filter else tiledbsoma.AxisQuery()


def read_obs(spec: SomaSpec, column_names: list[str]) -> pd.DataFrame:
    """The given obs columns of the cells passing spec.obs_filter."""
    handle, exp = open_experiment(spec)
    try:
        return exp.obs.read(value_filter=spec.obs_filter, column_names=column_names).concat().to_pandas()
    finally:
        handle.close()


def obs_columns(spec: SomaSpec) -> list[str]:
    handle, exp = open_experiment(spec)
    try:
        return list(exp.obs.schema.names)
    finally:
        handle.close()


def epoch_chunks(n_cells: int, chunk_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Contiguous chunks of cell positions, in the shuffled order of (seed, epoch)."""
    order = chunk_order(-(-n_cells // chunk_size), seed, epoch)
    return [np.arange(i * chunk_size, min((i + 1) * chunk_size, n_cells)) for i in order]


def chunk_order(n_chunks: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the chunks (the first step of the global order)."""
    return np.random.default_rng([seed, epoch, 0]).permutation(n_chunks)


class EpochOrder:
    """The global order of one epoch's batches ("units"), a function of (seed, epoch) and the plan sizes.

    Unit u is batch u - first_unit[b] of buffer b = buffer_of(u). Buffers are built lazily: an epoch of
    the Census is ~10^6 chunks, and a rank only needs the buffers of its own units.
    """

    def __init__(self, n_cells: int, chunk_size: int, buffer_chunks: int, batch_size: int, seed: int, epoch: int):
        self.n_cells, self.chunk_size, self.buffer_chunks, self.batch_size = (
            n_cells,
            chunk_size,
            buffer_chunks,
            batch_size,
        )
        self.seed, self.epoch = seed, epoch
        n_chunks = -(-n_cells // chunk_size)
        self.chunk_order = chunk_order(n_chunks, seed, epoch)
        chunk_len = np.full(n_chunks, chunk_size, dtype=np.int64)
        chunk_len[-1] = n_cells - (n_chunks - 1) * chunk_size
        buffer_len = np.add.reduceat(chunk_len[self.chunk_order], np.arange(0, n_chunks, buffer_chunks))
        self.batches_per_buffer = buffer_len // batch_size
        self.first_unit = np.concatenate([[0], np.cumsum(self.batches_per_buffer)])

    @property
    def n_units(self) -> int:
        return int(self.first_unit[-1])

    def buffer_of(self, units: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first_unit, units, side="right") - 1

    def buffer_cells(self, b: int) -> np.ndarray:
        """Buffer b's cell positions in their shuffled order (batch j = cells [j*batch_size, (j+1)*batch_size))."""
        chunks = self.chunk_order[b * self.buffer_chunks : (b + 1) * self.buffer_chunks]
        cells = np.concatenate(
            [np.arange(c * self.chunk_size, min((c + 1) * self.chunk_size, self.n_cells)) for c in chunks]
        )
        return cells[np.random.default_rng([self.seed, self.epoch, int(b), 1]).permutation(len(cells))]

    def batches(self, units: np.ndarray) -> list[np.ndarray]:
        """The (unsorted) cell positions of each unit; units of one buffer share one permutation."""
        out, buffers = [], self.buffer_of(units)
        cache: dict[int, np.ndarray] = {}
        for u, b in zip(units.tolist(), buffers.tolist(), strict=True):
            if b not in cache:
                cache = {b: self.buffer_cells(b)}
            j = u - int(self.first_unit[b])
            out.append(cache[b][j * self.batch_size : (j + 1) * self.batch_size])
        return out


def _as_units(intervals: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in intervals] or [np.zeros(0, dtype=np.int64)])


def _as_intervals(units: np.ndarray) -> list[list[int]]:
    """Sorted unit ids -> [[start, stop), ...] runs (how the state stores the units left)."""
    if len(units) == 0:
        return []
    breaks = np.flatnonzero(np.diff(units) != 1) + 1
    starts, stops = units[np.r_[0, breaks]], units[np.r_[breaks - 1, len(units) - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops, strict=True)]


def rank_units(remaining: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s units: an equal contiguous range of the units left (in global order)."""
    per_rank = len(remaining) // world_size
    return remaining[rank * per_rank : (rank + 1) * per_rank]


def units_left(remaining: np.ndarray, world_size: int, position: int) -> np.ndarray:
    """The units not yet consumed once every one of `world_size` ranks took `position` of its range."""
    per_rank = len(remaining) // world_size
    taken = np.zeros(len(remaining), dtype=bool)
    for r in range(world_size):
        taken[r * per_rank : r * per_rank + position] = True
    return remaining[~taken]


@dataclass
class _Rows:
    """One batch, or a worker's part of it, as a worker sends it: its rows of a canonical CSR block (the
    attributes make_batch reads) and its sorted cell positions. The consumer collates it
    (SomaBatches.make_batch)."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]
    positions: np.ndarray


class _Stream(IterableDataset):
    """One rank's batches from (epoch, skip) on, epoch after epoch, as CSR rows to collate. Every worker yields
    one item per batch, tagged (epoch, position): its part of the batch (the batch's cells in its range of the
    group being read, possibly none). The DataLoader takes one item from each worker in turn, so the parts of
    a batch arrive one after another, worker 0's first; the workers start once, not at every epoch."""

    def __init__(self, loader: SomaBatches, epoch: int, skip: int):
        self.loader = loader
        self.epoch = epoch
        self.skip = skip

    def _jobs(self, worker: int, n_workers: int) -> Iterator[tuple[int, np.ndarray, list]]:
        """(epoch, sorted positions to read, [(position, the batch's cells to send)]), group after group."""
        for epoch in itertools.count(self.epoch):
            skip = self.skip if epoch == self.epoch else 0
            for positions, wanted in self.loader.reads(epoch, skip, worker, n_workers):
                yield epoch, positions, wanted

    def __iter__(self) -> Iterator[tuple[tuple[int, int], _Rows]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        ld = self.loader
        jobs = self._jobs(worker, n_workers)
        # Read the next group in a thread while this one is handed out (TileDB releases the GIL), across epoch
        # boundaries too.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="soma-read") as pool:

            def submit(job):
                pieces = [p for p in np.array_split(job[1], ld.group_buffers) if len(p)]
                return (pieces, pool.submit(lambda: [ld.cells.read(p) for p in pieces])) if pieces else None

            job = next(jobs)
            pending = submit(job)
            while True:
                pieces, blocks = (pending[0], pending[1].result()) if pending is not None else ([], [])
                (epoch, _positions, wanted), job = job, next(jobs)
                pending = submit(job)
                for position, cells in wanted:
                    yield (epoch, position), _take_from_pieces(blocks, pieces, cells)


def _take_rows(block: sp.csr_matrix | None, rows: np.ndarray, positions: np.ndarray) -> _Rows:
    """Rows `rows` of a canonical CSR block (None: no rows) as _Rows; copies, so a batch does not pin the block."""
    if len(rows) == 0:
        empty = np.zeros(0, dtype=np.float32)
        return _Rows(empty, np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64), (0, 0), positions)
    starts = block.indptr[rows].astype(np.int64)
    lengths = block.indptr[rows + 1] - starts
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    take = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
    return _Rows(block.data[take], block.indices[take], indptr, (len(rows), block.shape[1]), positions)


def _take_from_pieces(blocks: list[sp.csr_matrix], pieces: list[np.ndarray], cells: np.ndarray) -> _Rows:
    """The rows of `cells` (sorted) from the blocks read for `pieces` (sorted, ascending, disjoint positions)."""
    parts = []
    for block, piece in zip(blocks, pieces, strict=True):
        mine = cells[(cells >= piece[0]) & (cells <= piece[-1])]
        if len(mine):
            parts.append(_take_rows(block, np.searchsorted(piece, mine), mine))
    return _merge_parts(parts) if parts else _take_rows(None, cells, cells)


def _merge_parts(parts: list[_Rows]) -> _Rows:
    """One batch from the workers' parts, in worker order: worker w's range of cell positions lies below worker
    w + 1's, so stacking the parts keeps the rows sorted by position."""
    full = [p for p in parts if len(p.positions)]
    if len(full) == 1:
        return full[0]
    positions = np.concatenate([p.positions for p in full])
    if np.any(positions[1:] <= positions[:-1]):
        raise RuntimeError("the loader's workers sent overlapping or unordered parts of a batch")
    offsets = np.cumsum([0] + [int(p.indptr[-1]) for p in full[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(full, offsets, strict=True)])
    return _Rows(
        np.concatenate([p.data for p in full]),
        np.concatenate([p.indices for p in full]),
        indptr,
        (len(positions), full[0].shape[1]),
        positions,
    )


class SomaBatches:
    """Endless stream of CellBatch from a SOMA experiment; see the module docstring for the order.

    rank / world_size default to this process's global rank and world size (`scldm_scale.world`).
    """

    def __init__(
        self,
        cells: SomaCells,
        encoders: dict[str, LabelEncoder],
        batch_size: int,
        seed: int,
        chunk_size: int = 64,
        buffer_chunks: int = 1024,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        policy: TokenPolicy = EXPRESSED_ONLY,
        decode_genes: int | None = None,
        group_buffers: int = 1,
    ):
        if group_buffers < 1:
            raise DataError(
                f"data.group_buffers must be >= 1 (buffers a loader process reads a group), got {group_buffers}"
            )
        self.group_buffers = group_buffers
        self.policy = policy
        self.decode_genes = decode_genes
        self.cells = cells
        self.encoders = encoders
        self.condition_ids = {k: enc.encode(cells.labels[k]) for k, enc in encoders.items()}
        self.seed = seed
        self.chunk_size = chunk_size
        self.buffer_chunks = buffer_chunks
        self.num_workers = num_workers
        self.rank, self.world_size = rank_and_world_size(rank, world_size)
        if self.world_size > len(cells):
            raise DataError(f"{len(cells)} cells cannot be shared among {self.world_size} ranks")
        self.batch_size = min(batch_size, max(1, len(cells) // self.world_size))
        if self.batch_size < batch_size:
            log.warning("batch size %d > cells per rank; using %d", batch_size, self.batch_size)
        self.epoch = 0
        self.position = 0
        # Units of this epoch left when the current rank layout began (None: the whole epoch).
        self._remaining: list[list[int]] | None = None
        self._stream: Iterator[CellBatch] | None = None

    @property
    def size(self) -> int:
        return len(self.cells)

    def order(self, epoch: int) -> EpochOrder:
        return EpochOrder(len(self.cells), self.chunk_size, self.buffer_chunks, self.batch_size, self.seed, epoch)

    def _remaining_units(self, epoch: int, order: EpochOrder) -> np.ndarray:
        if epoch == self.epoch and self._remaining is not None:
            return _as_units(self._remaining)
        return np.arange(order.n_units)

    def plan(self, epoch: int) -> tuple[EpochOrder, np.ndarray]:
        """The epoch's order and this rank's units, in the order it yields them."""
        order = self.order(epoch)
        units = rank_units(self._remaining_units(epoch, order), self.rank, self.world_size)
        if len(units) == 0:
            raise DataError(
                f"epoch {epoch} has fewer batches of {self.batch_size} cells than ranks ({self.world_size}): lower "
                "train.batch_size, or raise data.chunk_size x data.buffer_chunks (the cells of one shuffle buffer)"
            )
        return order, units

    def _runs(self, epoch: int, skip: int) -> tuple[EpochOrder, np.ndarray, list[tuple[int, int]]]:
        """The epoch's order, this rank's units and its runs [first, stop) of units in one buffer, from `skip`."""
        order, units = self.plan(epoch)
        buffers = order.buffer_of(units)
        starts = np.flatnonzero(np.r_[True, buffers[1:] != buffers[:-1]])
        bounds = np.r_[starts, len(units)]
        runs = [(max(int(bounds[k]), skip), int(bounds[k + 1])) for k in range(len(starts))]
        return order, units, runs

    def reads(self, epoch: int, skip: int, worker: int, n_workers: int) -> list[tuple[np.ndarray, list]]:
        """This worker's reads of the epoch from stream position `skip` on, as (sorted positions to read,
        [(stream position, the batch's cells among them, sorted)] for every batch of the group read).

        The runs of units in one buffer are taken n_workers x group_buffers at a time. Of each such group,
        worker w reads the cells in the w-th of n_workers contiguous ranges of cell positions (equal shares of
        the group's cells), so no two workers decompress the same tiles. On a layout whose tiles span many cells
        (the Census: 2,048 genes by hundreds of cells) a read of cells scattered over the whole experiment
        touches nearly every tile: n workers each reading a whole buffer would decompress it all n times.
        (_Stream cuts a worker's range into group_buffers reads.)
        """
        order, units, runs = self._runs(epoch, skip)
        runs = [(first, stop) for first, stop in runs if first < stop]
        jobs = []
        per_group = n_workers * self.group_buffers
        for g in range(0, len(runs), per_group):
            first, stop = runs[g][0], runs[min(g + per_group, len(runs)) - 1][1]
            batches = [np.sort(cells) for cells in order.batches(units[first:stop])]
            group = np.sort(np.concatenate(batches))
            mine = group[len(group) * worker // n_workers : len(group) * (worker + 1) // n_workers]
            lo, hi = (mine[0], mine[-1]) if len(mine) else (1, 0)
            wanted = [(p, c[(c >= lo) & (c <= hi)]) for p, c in zip(range(first, stop), batches, strict=True)]
            jobs.append((mine, wanted))
        return jobs

    def limit(self, epoch: int) -> int:
        """Batches every rank yields in this epoch (the same on all ranks)."""
        order = self.order(epoch)
        return len(self._remaining_units(epoch, order)) // self.world_size

    def make_batch(
        self, block: sp.csr_matrix | _Rows, positions: np.ndarray, start: int = 0, epoch: int | None = None
    ) -> CellBatch:
        """The batch of the cells at `positions` (sorted): rows [start, start + len(positions)) of a block
        from SomaCells.read (canonical CSR), or of a worker's _Rows. A batch of the training stream passes its
        `epoch`: with decode_genes set, it decodes a subset drawn from (seed, epoch, positions); without (reads
        in order, for latents or library sizes) it decodes every gene."""
        conditions = {k: v[positions] for k, v in self.condition_ids.items()}
        # Sampled zero tokens depend on the cells of the batch and the seed only: reproducible on resume.
        rng = np.random.default_rng([self.seed, *positions.tolist()]) if self.policy.mode != "expressed" else None
        stop = start + len(positions)
        a, b = block.indptr[start], block.indptr[stop]
        columns = None
        if self.decode_genes is not None and epoch is not None:
            draw = np.random.default_rng([self.seed, epoch, *positions.tolist()])
            expressed = np.unique(block.indices[a:b])
            columns = draw_decode_columns(expressed, block.shape[1], self.decode_genes, draw)
        return collate_csr(
            block.data[a:b],
            block.indices[a:b],
            block.indptr[start : stop + 1],
            block.shape[1],
            conditions,
            self.cells.decode_gene_ids,
            self.policy,
            rng,
            columns,
        )

    def _epoch_stream(self) -> Iterator[CellBatch]:
        self.plan(self.epoch)  # a clear error here, not in a worker
        dataset = _Stream(self, self.epoch, self.position)
        if self.num_workers == 0:
            tagged: Iterator = iter(dataset)
        else:
            tagged = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    multiprocessing_context="spawn",  # tiledbsoma is not fork-safe
                    # Ctrl-C reaches the whole process group: the workers must outlive it until the trainer
                    # has finished its step and checkpointed. (SIGTERM is left alone: the DataLoader stops
                    # its own workers with it.)
                    worker_init_fn=_ignore_sigint,
                    collate_fn=_as_sent,  # not default_convert, which would turn numpy arrays into tensors
                )
            )
        # Each worker sends its part of every batch, in turn: a batch is whole once the last part has arrived.
        n_parts = max(self.num_workers, 1)
        parts: list[_Rows] = []
        pin = self.num_workers > 0 and torch.cuda.is_available()
        limit = self.limit(self.epoch)
        for key, rows in tagged:
            if tuple(key) != (self.epoch, self.position):  # the DataLoader hands tuples over as lists
                raise RuntimeError(f"loader stream out of order: batch {tuple(key)} for {(self.epoch, self.position)}")
            parts.append(rows)
            if len(parts) < n_parts:
                continue
            rows, parts = _merge_parts(parts), []
            out = self.make_batch(rows, rows.positions, 0, self.epoch)
            self.position += 1
            if self.position == limit:
                self.epoch, self.position, self._remaining = self.epoch + 1, 0, None
                limit = self.limit(self.epoch)
            yield out.pin_memory() if pin else out

    def __iter__(self) -> Iterator[CellBatch]:
        return self

    def __next__(self) -> CellBatch:
        if self._stream is None:
            self._stream = self._epoch_stream()
        return next(self._stream)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        # Workers need the plan, not the main process's live iterator and reader thread.
        state["_stream"] = None
        return state

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "remaining": self._remaining,
            # The plan's sizes: the units mean other cells if any of these differ.
            "plan": self._plan_sizes(),
        }

    def _plan_sizes(self) -> dict:
        return {
            "n_cells": len(self.cells),
            "chunk_size": self.chunk_size,
            "buffer_chunks": self.buffer_chunks,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream; with another number of ranks, the units left are split among the new ones."""
        saved = state.get("plan")
        if saved is not None and saved != self._plan_sizes():
            diff = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self._plan_sizes().items() if saved.get(k) != v)
            raise DataError(
                f"the loader state was saved with other settings ({diff}): an exact resume needs the same data "
                "split, data.chunk_size, data.buffer_chunks and train.batch_size (the per-rank batch)"
            )
        self.seed, self.epoch = state["seed"], state["epoch"]
        self._remaining = state.get("remaining")
        saved_world = state.get("world_size", self.world_size)
        if saved_world == self.world_size:
            self.position = state["position"]
        else:
            order = self.order(self.epoch)
            left = units_left(self._remaining_units(self.epoch, order), saved_world, state["position"])
            if len(left) < self.world_size:  # too few batches left for every new rank: the epoch is done
                self.epoch, self.position, self._remaining, self._stream = self.epoch + 1, 0, None, None
                return
            log.info(
                "loader: resuming epoch %d on %d ranks instead of %d; %d batches of it are left",
                self.epoch,
                self.world_size,
                saved_world,
                len(left),
            )
            self._remaining, self.position = _as_intervals(left), 0
        self._stream = None


def _as_sent(item):
    return item


def _ignore_sigint(_worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
