"""Streaming cells from a TileDB-SOMA experiment (a local one, or the CELLxGENE Census).

Shuffling is scatter-gather, and the order is a function of (seed, epoch) and the rank count alone:
1. the split's cells (sorted soma_joinids) are cut into contiguous chunks of `chunk_size` cells;
2. the chunk order is permuted by (seed, epoch) — globally, before any sharding;
3. the shuffled chunks are dealt round-robin to ranks (chunk i -> rank i % world_size), so every rank
   sees cells from all over the experiment and a different set each epoch (tiledbsoma-ml 0.1.0 instead
   gives each rank one fixed contiguous block, in the same order every epoch);
4. each rank groups its chunks into buffers of `buffer_chunks` chunks, reads a buffer (one SOMA read of
   those joinids), permutes its cells by (seed, epoch, rank, buffer) and cuts it into batches; a buffer's
   last incomplete batch is dropped so batches never straddle buffers;
   Each worker reads its next buffer in a background thread while it collates the current one.
5. DataLoader workers take buffers round-robin (buffer b -> worker b % num_workers) and the rank's
   stream is put back in buffer order, so the stream does not depend on the number of workers;
6. every rank stops each epoch after the same number of steps (the minimum over ranks), so DDP never
   waits at an epoch's end for a rank with one more batch.

The state (epoch, batches consumed in the epoch, seed) resumes the stream exactly, also with a
different number of workers; a different number of ranks gives a different per-rank stream.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scldm_scale.data.counts import DataError
from scldm_scale.data.dataset import EXPRESSED_ONLY, CellBatch, LabelEncoder, TokenPolicy, collate

MEASUREMENT = "RNA"
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


def open_experiment(spec: SomaSpec):
    """The Experiment to read: a SOMA experiment, or the `homo_sapiens`-style one inside a Census."""
    if spec.census:
        import cellxgene_census

        try:
            if spec.uri:
                census = cellxgene_census.open_soma(uri=spec.uri)
            else:
                census = cellxgene_census.open_soma(census_version=spec.census_version)
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
        exp = tiledbsoma.Experiment.open(spec.uri)
    except Exception as err:  # tiledbsoma raises DoesNotExistError, SOMAError, ...
        raise DataError(
            f"cannot open SOMA experiment {spec.uri}: {err}; create one with `scldm-scale prepare`"
        ) from None
    return exp, exp


class SomaCells:
    """The cells of an experiment that pass `obs_filter`, read as CSR rows over a gene vocabulary.

    The vocabulary is keyed by feature id. With `vocabulary` given (a trained model's genes), the
    experiment's genes are matched to it by id: genes absent from the vocabulary are ignored, and
    `decode_gene_ids` lists the vocabulary positions present in the experiment, so a model reads an
    experiment whose genes are another subset or order.
    """

    def __init__(self, spec: SomaSpec, vocabulary: list[str] | None = None):
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
            var = ms.var.read(value_filter=spec.var_filter, column_names=["soma_joinid", "feature_id"])
            var = var.concat().to_pandas()
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
        if vocabulary is None:
            vocabulary = feature_ids.tolist()
        self.vocabulary = list(vocabulary)
        position = {g: i for i, g in enumerate(self.vocabulary)}
        vocab_pos = np.array([position.get(g, -1) for g in feature_ids])
        present = vocab_pos >= 0
        if not present.any():
            raise DataError(f"{spec.uri}: none of its genes are in the model's vocabulary (matched by feature_id)")
        # Columns of the CSR blocks = the experiment's genes that are in the vocabulary, in vocabulary order.
        order = np.argsort(vocab_pos[present])
        self.decode_gene_ids = vocab_pos[present][order]  # (G_present,) vocabulary positions
        var_joinids = var["soma_joinid"].to_numpy(dtype=np.int64)[present][order]
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
        rows = np.searchsorted(joinids, table["soma_dim_0"].to_numpy())
        var_ids = table["soma_dim_1"].to_numpy()
        in_range = var_ids < len(self._column_of_var)
        cols = np.full(len(var_ids), -1, dtype=np.int64)
        cols[in_range] = self._column_of_var[var_ids[in_range]]
        keep = cols >= 0
        data = table["soma_data"].to_numpy()[keep].astype(np.float32)
        shape = (len(positions), len(self.decode_gene_ids))
        return sp.csr_matrix((data, (rows[keep], cols[keep])), shape=shape)  # COO -> CSR in O(nnz)


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


def obs_columns(spec: SomaSpec) -> list[str]:
    handle, exp = open_experiment(spec)
    try:
        return list(exp.obs.schema.names)
    finally:
        handle.close()


def epoch_chunks(n_cells: int, chunk_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Contiguous chunks of cell positions, in the shuffled order of (seed, epoch)."""
    starts = np.arange(0, n_cells, chunk_size)
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(starts))
    return [np.arange(starts[i], min(starts[i] + chunk_size, n_cells)) for i in order]


def rank_buffers(
    n_cells: int, chunk_size: int, buffer_chunks: int, seed: int, epoch: int, rank: int, world_size: int
) -> list[np.ndarray]:
    """The buffers (arrays of cell positions, unshuffled) this rank reads in an epoch, in order."""
    mine = epoch_chunks(n_cells, chunk_size, seed, epoch)[rank::world_size]
    return [np.concatenate(mine[i : i + buffer_chunks]) for i in range(0, len(mine), buffer_chunks)]


def steps_per_epoch(
    n_cells: int, chunk_size: int, buffer_chunks: int, batch_size: int, seed: int, epoch: int, world_size: int
) -> int:
    """Batches every rank yields in this epoch: the minimum over ranks, so all ranks stay in step."""
    per_rank = [
        sum(len(b) // batch_size for b in rank_buffers(n_cells, chunk_size, buffer_chunks, seed, epoch, r, world_size))
        for r in range(world_size)
    ]
    return min(per_rank)


def buffer_batches(buffer: np.ndarray, batch_size: int, seed: int, epoch: int, rank: int, index: int):
    """A buffer's cells permuted by (seed, epoch, rank, index), cut into full batches."""
    perm = buffer[np.random.default_rng([seed, epoch, rank, index, 1]).permutation(len(buffer))]
    return [perm[i : i + batch_size] for i in range(0, len(perm) - batch_size + 1, batch_size)]


class _EpochStream(IterableDataset):
    """One rank's batches for one epoch; workers take buffers round-robin and tag what they yield."""

    def __init__(self, loader: SomaBatches, epoch: int, skip: int):
        self.loader = loader
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, CellBatch]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        ld = self.loader
        buffers = rank_buffers(
            len(ld.cells), ld.chunk_size, ld.buffer_chunks, ld.seed, self.epoch, ld.rank, ld.world_size
        )
        index = 0  # position of the next batch in this rank's epoch stream
        jobs = []  # (sorted positions to read, [(stream position, cells)]) for this worker's buffers
        for b, buffer in enumerate(buffers):
            batches = buffer_batches(buffer, ld.batch_size, ld.seed, self.epoch, ld.rank, b)
            first = index
            index += len(batches)
            if b % n_workers != worker:
                continue
            limit = ld.limit(self.epoch)
            wanted = [(first + i, cells) for i, cells in enumerate(batches) if self.skip <= first + i < limit]
            if wanted:
                jobs.append((np.sort(np.concatenate([cells for _, cells in wanted])), wanted))
        # Read the next buffer in a thread while this one is collated (TileDB releases the GIL).
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(ld.cells.read, jobs[0][0]) if jobs else None
            for j, (block_positions, wanted) in enumerate(jobs):
                block = pending.result()
                if j + 1 < len(jobs):
                    pending = pool.submit(ld.cells.read, jobs[j + 1][0])
                for position, cells in wanted:
                    yield position, ld.make_batch(block, block_positions, np.sort(cells))


class SomaBatches:
    """Endless stream of CellBatch from a SOMA experiment; see the module docstring for the order.

    rank / world_size default to torch.distributed's global rank and world size (never LOCAL_RANK: two
    nodes would read the same cells), else RANK / WORLD_SIZE from the environment, else 0 / 1.
    """

    def __init__(
        self,
        cells: SomaCells,
        encoders: dict[str, LabelEncoder],
        batch_size: int,
        seed: int,
        chunk_size: int = 64,
        buffer_chunks: int = 256,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        policy: TokenPolicy = EXPRESSED_ONLY,
    ):
        self.policy = policy
        self.cells = cells
        self.encoders = encoders
        self.condition_ids = {k: enc.encode(cells.labels[k]) for k, enc in encoders.items()}
        self.seed = seed
        self.chunk_size = chunk_size
        self.buffer_chunks = buffer_chunks
        self.num_workers = num_workers
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.batch_size = min(batch_size, max(1, len(cells) // self.world_size))
        if self.batch_size < batch_size:
            log.warning("batch size %d > cells per rank; using %d", batch_size, self.batch_size)
        if self.world_size > len(cells):
            raise DataError(f"{len(cells)} cells cannot be shared among {self.world_size} ranks")
        self.epoch = 0
        self.position = 0
        self._limits: dict[int, int] = {}
        self._stream: Iterator[CellBatch] | None = None

    @property
    def size(self) -> int:
        return len(self.cells)

    def limit(self, epoch: int) -> int:
        if epoch not in self._limits:
            self._limits[epoch] = steps_per_epoch(
                len(self.cells), self.chunk_size, self.buffer_chunks, self.batch_size, self.seed, epoch, self.world_size
            )
            if self._limits[epoch] == 0:
                raise DataError(
                    f"batch_size={self.batch_size} is larger than any buffer of {self.chunk_size * self.buffer_chunks} "
                    "cells; lower train.batch_size or raise data.chunk_size / data.buffer_chunks"
                )
        return self._limits[epoch]

    def make_batch(self, block: sp.csr_matrix, block_positions: np.ndarray, positions: np.ndarray) -> CellBatch:
        rows = np.searchsorted(block_positions, positions)
        conditions = {k: v[positions] for k, v in self.condition_ids.items()}
        # Sampled zero tokens depend on the cells of the batch and the seed only: reproducible on resume.
        rng = np.random.default_rng([self.seed, *positions.tolist()]) if self.policy.mode != "expressed" else None
        return collate(block[rows], conditions, self.cells.decode_gene_ids, self.policy, rng)

    def _epoch_stream(self) -> Iterator[CellBatch]:
        while True:
            dataset = _EpochStream(self, self.epoch, self.position)
            if self.num_workers == 0:
                tagged: Iterator = iter(dataset)
            else:
                tagged = iter(
                    DataLoader(
                        dataset,
                        batch_size=None,
                        num_workers=self.num_workers,
                        multiprocessing_context="spawn",  # tiledbsoma is not fork-safe
                        # Ctrl-C reaches the whole process group: the workers must outlive it until the
                        # trainer has finished its step and checkpointed. (SIGTERM is left alone: the
                        # DataLoader stops its own workers with it.)
                        worker_init_fn=_ignore_sigint,
                        pin_memory=torch.cuda.is_available(),
                    )
                )
            pending: dict[int, CellBatch] = {}
            for position, batch in tagged:
                pending[position] = batch
                while self.position in pending:
                    out = pending.pop(self.position)
                    self.position += 1
                    yield out
            self.epoch += 1
            self.position = 0

    def __iter__(self) -> Iterator[CellBatch]:
        return self

    def __next__(self) -> CellBatch:
        if self._stream is None:
            self._stream = self._epoch_stream()
        return next(self._stream)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_stream"] = None  # workers need the plan, not the main process's live iterator
        return state

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            raise DataError(
                f"loader state was saved with {state['world_size']} ranks, now {self.world_size}: the per-rank "
                "stream differs, so an exact resume needs the same number of ranks"
            )
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        self._limits.clear()  # steps per epoch depend on the seed
        self._stream = None


def _ignore_sigint(_worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
