"""Streaming from SOMA: batch contents, the shuffle plan, rank/worker sharding, exact resume, vocabulary
alignment, a Census-shaped local collection, and the `open_train_cells` entry point.

The `soma_experiment` fixture gives every cell a marker gene counting soma_joinid + 1, so the cells of a
batch are read off its target column instead of being inferred.
"""

import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma
import tiledbsoma.io
import torch

import scldm_scale.data.soma as soma
from scldm_scale.config import ConfigError, DataConfig, load_config
from scldm_scale.data.batch import LabelEncoder, collate
from scldm_scale.data.census import census_collection, experiment_path, link_experiment
from scldm_scale.data.counts import DataError
from scldm_scale.data.soma import EpochOrder, SomaBatches, SomaCells, SomaSpec, epoch_chunks, rank_units, units_left
from scldm_scale.data.source import open_train_cells
from scldm_scale.data.vocab import GeneVocabulary

TRAIN = "split == 'train'"
# 320 train cells: 40 chunks of 8, buffers of 3 chunks (24 cells, 4 batches of 6): 13 buffers of 24 cells
# and one of 8 (one batch, 2 cells dropped) -> 53 batches ("units") an epoch.
PLAN = {"batch_size": 6, "chunk_size": 8, "buffer_chunks": 3}


@pytest.fixture(scope="module")
def train_cells(soma_experiment) -> SomaCells:
    return SomaCells(SomaSpec(soma_experiment.uri, obs_filter=TRAIN, condition_keys=["cell_type"]))


def _loader(cells: SomaCells, seed: int = 0, **kwargs) -> SomaBatches:
    encoders = {k: LabelEncoder.fit(k, v) for k, v in cells.labels.items()}
    return SomaBatches(cells, encoders, seed=seed, **{**PLAN, **kwargs})


def _joinids(batch, marker_column: int) -> np.ndarray:
    """soma_joinid of each row of a batch, read off the marker gene (count = joinid + 1)."""
    return batch.target[:, marker_column].numpy().astype(np.int64) - 1


def _take(loader: SomaBatches, n: int, marker_column: int) -> list[np.ndarray]:
    return [_joinids(next(loader), marker_column) for _ in range(n)]


# --- what a batch holds --------------------------------------------------------------------------------


def test_cells_are_the_filtered_split_in_joinid_order(train_cells, soma_experiment):
    exp = soma_experiment
    train = np.flatnonzero(exp.split == "train")
    np.testing.assert_array_equal(train_cells.joinids, train)
    np.testing.assert_array_equal(train_cells.labels["cell_type"], exp.cell_type[train])
    np.testing.assert_array_equal(train_cells.n_counts, exp.counts[train].sum(axis=1))
    assert train_cells.vocabulary.ids == exp.gene_ids
    np.testing.assert_array_equal(train_cells.decode_gene_ids, np.arange(len(exp.gene_ids)))
    positions = np.array([0, 5, 6, 200, 319])
    np.testing.assert_array_equal(train_cells.read(positions).toarray(), exp.counts[train[positions]])


def test_batches_equal_collate_of_the_source_rows(train_cells, soma_experiment):
    exp = soma_experiment
    loader = _loader(train_cells)
    encoder = loader.encoders["cell_type"]
    for _ in range(5):
        batch = next(loader)
        joinids = _joinids(batch, exp.marker_column)
        assert np.isin(joinids, train_cells.joinids).all()
        expected = collate(
            sp.csr_matrix(exp.counts[joinids]),
            {"cell_type": encoder.encode(exp.cell_type[joinids])},
        )
        assert batch.size == PLAN["batch_size"]
        for name in ("gene_ids", "counts", "mask", "target", "decode_gene_ids", "library_size"):
            torch.testing.assert_close(getattr(batch, name), getattr(expected, name), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(batch.conditions["cell_type"], expected.conditions["cell_type"], rtol=0, atol=0)
    assert encoder.values == ["type_0", "type_1", "type_2"]


# --- the shuffle plan (pure functions) -----------------------------------------------------------------


@pytest.mark.parametrize("spread", [1, 100])  # joinids dense in their range (lookup table) or sparse (search)
def test_csr_from_triples_matches_scipy_in_any_order_dropping_zeros_and_genes_outside_the_vocabulary(spread):
    rng = np.random.default_rng(0)
    joinids = np.sort(rng.choice(40 * spread, size=30, replace=False)).astype(np.int64)
    dense = rng.poisson(0.5, size=(30, 12)).astype(np.float32)  # zeros among the stored values too
    rows, var = np.nonzero(np.ones_like(dense))
    column_of_var = np.array([0, 1, -1, 2, 3, 4, 5, 6, -1, 7], dtype=np.int64)  # var 2, 8 and 10, 11 are dropped
    order = rng.permutation(len(rows))  # TileDB's order: gene tile by gene tile, so rows repeat
    values = dense[rows, var][order]
    indptr, indices, data, canonical = soma._csr_from_triples(
        joinids[rows][order], var[order].astype(np.int64), values, joinids, column_of_var
    )
    block = sp.csr_matrix((data, indices, indptr), shape=(30, 8))
    assert not canonical  # shuffled: a row's columns arrive out of order
    block.sum_duplicates()
    kept = np.flatnonzero(column_of_var >= 0)
    want = sp.csr_matrix(dense[:, kept])
    assert (block != want).nnz == 0 and block.nnz == want.nnz  # no stored zeros
    in_order = np.lexsort((var, rows))
    *_, canonical = soma._csr_from_triples(
        joinids[rows][in_order], var[in_order].astype(np.int64), dense[rows, var][in_order], joinids, column_of_var
    )
    assert canonical


def test_epoch_chunks_are_a_permutation_of_contiguous_chunks():
    n_cells, chunk_size = 317, 8  # not a multiple: the last chunk holds 5 cells
    chunks = epoch_chunks(n_cells, chunk_size, seed=0, epoch=0)
    assert len(chunks) == 40
    np.testing.assert_array_equal(np.sort(np.concatenate(chunks)), np.arange(n_cells))
    for chunk in chunks:
        np.testing.assert_array_equal(chunk, np.arange(chunk[0], chunk[0] + len(chunk)))
        assert chunk[0] % chunk_size == 0
    starts = [int(c[0]) for c in chunks]
    assert starts != sorted(starts)
    assert starts == [int(c[0]) for c in epoch_chunks(n_cells, chunk_size, seed=0, epoch=0)]
    assert starts != [int(c[0]) for c in epoch_chunks(n_cells, chunk_size, seed=0, epoch=1)]
    assert starts != [int(c[0]) for c in epoch_chunks(n_cells, chunk_size, seed=1, epoch=0)]


def _plan(n_cells: int = 320, seed: int = 0, epoch: int = 0) -> EpochOrder:
    return EpochOrder(n_cells, PLAN["chunk_size"], PLAN["buffer_chunks"], PLAN["batch_size"], seed, epoch)


def test_epoch_order_units_are_shuffled_buffers_cut_into_batches():
    # 317 cells: 39 chunks of 8 and one of 5; 14 buffers: 13 of 3 chunks, 1 of 1. Either the short chunk is
    # in a 3-chunk buffer (21 cells: 3 batches; 12 x 4 + 3 + 1) or alone (0 batches; 13 x 4): 52 units.
    order = _plan(317)
    assert order.n_units == sum(order.batches_per_buffer) == 52
    cells = order.batches(np.arange(order.n_units))
    assert all(len(c) == 6 for c in cells)
    flat = np.concatenate(cells)
    assert len(np.unique(flat)) == len(flat)  # no cell twice in an epoch
    for b in range(len(order.batches_per_buffer)):  # a buffer's batches come from its own chunks only
        units = np.arange(order.first_unit[b], order.first_unit[b + 1])
        chunks = set((np.concatenate(order.batches(units)) // 8).tolist()) if len(units) else set()
        assert chunks <= set(order.chunk_order[b * 3 : (b + 1) * 3].tolist())
    again = np.concatenate(_plan(317).batches(np.arange(order.n_units)))
    np.testing.assert_array_equal(again, flat)
    for other in (_plan(317, seed=1), _plan(317, epoch=1)):
        assert np.concatenate(other.batches(np.arange(other.n_units))).tolist() != flat.tolist()


def test_a_rank_reads_from_the_whole_range_and_other_cells_each_epoch():
    ranges = []
    for epoch in (0, 1):
        order = _plan(epoch=epoch)
        units = rank_units(np.arange(order.n_units), rank=0, world_size=2)
        ranges.append(np.concatenate(order.batches(units)))
    for cells in ranges:
        assert len(cells) == (53 // 2) * 6
        # A contiguous block per rank would be cells 0..159; these come from every quarter of the range.
        assert [int(((cells >= q * 80) & (cells < (q + 1) * 80)).sum()) > 0 for q in range(4)] == [True] * 4
    assert set(ranges[0].tolist()) != set(ranges[1].tolist())


def test_ranks_get_equal_contiguous_ranges_of_the_global_order():
    units = np.arange(53)
    parts = [rank_units(units, r, 3) for r in range(3)]
    assert [p.tolist() for p in parts] == [list(range(0, 17)), list(range(17, 34)), list(range(34, 51))]
    # After each of 3 ranks took 5, the rest is split among 2 ranks in global order.
    left = units_left(units, world_size=3, position=5)
    assert left.tolist() == [*range(5, 17), *range(22, 34), *range(39, 53)]
    assert [rank_units(left, r, 2).tolist() for r in range(2)] == [left[:19].tolist(), left[19:38].tolist()]


# --- order: seeded, new each epoch -------------------------------------------------------------------


def test_same_seed_same_stream_other_seed_or_epoch_other_order(train_cells, soma_experiment):
    marker = soma_experiment.marker_column
    first = _take(_loader(train_cells, seed=0), 4, marker)
    again = _take(_loader(train_cells, seed=0), 4, marker)
    assert [b.tolist() for b in first] == [b.tolist() for b in again]
    other_seed = _take(_loader(train_cells, seed=1), 4, marker)
    assert set(np.concatenate(first).tolist()) != set(np.concatenate(other_seed).tolist())

    loader = _loader(train_cells, seed=0)
    epoch0 = _take(loader, loader.limit(0), marker)
    epoch1 = _take(loader, 4, marker)
    assert {k: v for k, v in loader.state_dict().items() if k != "plan"} == {
        "epoch": 1,
        "position": 4,
        "seed": 0,
        "world_size": 1,
        "remaining": None,
    }
    assert set(epoch0[0].tolist()) != set(epoch1[0].tolist())
    assert [b.tolist() for b in epoch0[:4]] == [b.tolist() for b in first]
    # One epoch, no cell twice: 13 buffers of 24 cells (4 batches each) and one of 8 (1 batch, 2 cells dropped).
    seen = np.concatenate(epoch0)
    assert len(np.unique(seen)) == len(seen) == 13 * 24 + 6


# --- sharding over ranks and workers -------------------------------------------------------------------


def _worker_stream(loader: SomaBatches, worker: int, n_workers: int, monkeypatch, skip: int = 0) -> Iterator:
    """What DataLoader worker `worker` of `n_workers` would yield, run in this process (endless)."""
    monkeypatch.setattr(soma, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=n_workers))
    return iter(soma._Stream(loader, epoch=0, skip=skip))


def _parts(loader: SomaBatches, worker: int, n_workers: int, monkeypatch) -> list[tuple[int, soma._Rows]]:
    """A worker's items of epoch 0 as (position, its part of that batch)."""
    tagged = _worker_stream(loader, worker, n_workers, monkeypatch)
    return [(p, rows) for (_, p), rows in itertools.takewhile(lambda x: x[0][0] == 0, tagged)]


def _joined(loader: SomaBatches, n_workers: int, monkeypatch) -> list:
    """Epoch 0's batches as the consumer builds them: each batch's parts, one per worker, joined and collated."""
    per_worker = [_parts(loader, w, n_workers, monkeypatch) for w in range(n_workers)]
    batches = []
    for items in zip(*per_worker, strict=True):
        assert len({p for p, _ in items}) == 1  # the workers' items come batch by batch, in the same order
        rows = soma._merge_parts([r for _, r in items])
        batches.append(loader.make_batch(rows, rows.positions, 0, 0))
    return batches


def _assert_workers_read_disjoint_ranges(loader: SomaBatches, n_workers: int) -> None:
    """In every group, worker w's cells all lie below worker w + 1's, and together they are the group's cells."""
    reads = [loader.reads(0, 0, w, n_workers) for w in range(n_workers)]
    assert len({len(r) for r in reads}) == 1
    for group in zip(*reads, strict=True):
        read = [positions for positions, _ in group]
        for below, above in itertools.pairwise(r for r in read if len(r)):
            assert below.max() < above.min()
        sent = [np.concatenate([c for _, c in wanted]) for _, wanted in group]
        for positions, cells in zip(read, sent, strict=True):
            np.testing.assert_array_equal(np.sort(cells), positions)  # a worker reads only cells it sends
        assert max(len(r) for r in read) - min(len(r) for r in read) <= 1  # equal shares


def test_ranks_and_workers_partition_an_epoch(train_cells, soma_experiment, monkeypatch):
    marker = soma_experiment.marker_column
    world_size, n_workers = 2, 2
    limit = 53 // world_size
    streams = {}
    for rank in range(world_size):
        loader = _loader(train_cells, rank=rank, world_size=world_size, num_workers=n_workers)
        assert loader.limit(0) == limit
        parts = [_parts(loader, w, n_workers, monkeypatch) for w in range(n_workers)]
        for w in range(n_workers):  # every worker yields a part of each of the rank's batches, in order
            assert [p for p, _ in parts[w]] == list(range(limit))
            assert sum(len(rows.positions) for _, rows in parts[w]) > 0  # and both workers read
        _assert_workers_read_disjoint_ranges(loader, n_workers)
        streams[rank] = _joined(loader, n_workers, monkeypatch)
        assert all(len(b.target) == PLAN["batch_size"] for b in streams[rank])

    cells = {rank: np.concatenate([_joinids(b, marker) for b in batches]) for rank, batches in streams.items()}
    every = np.concatenate(list(cells.values()))
    assert len(np.unique(every)) == len(every) == world_size * limit * PLAN["batch_size"]
    # Together the ranks read the epoch's first 2 x 26 units of the global order: all but one batch.
    order = _plan()
    planned = np.concatenate(order.batches(np.arange(world_size * limit)))
    np.testing.assert_array_equal(np.sort(every), np.sort(train_cells.joinids[planned]))


def test_joined_parts_collate_to_the_in_process_batches(train_cells, monkeypatch):
    # Workers send their parts of a batch as CSR rows and the consumer joins and collates them: the same
    # batches as collating the read block, for 2 and 3 workers.
    for n_workers in (2, 3):
        loader = _loader(train_cells, num_workers=n_workers)
        got = _joined(loader, n_workers, monkeypatch)
        order, units = loader.plan(0)
        assert len(got) == loader.limit(0)
        for position, batch in list(enumerate(got))[:8]:
            cells = np.sort(order.batches(units[position : position + 1])[0])
            want = loader.make_batch(train_cells.read(cells), cells, 0, 0)
            for name in ("gene_ids", "counts", "mask", "target", "decode_gene_ids", "library_size"):
                torch.testing.assert_close(getattr(batch, name), getattr(want, name), rtol=0, atol=0, msg=name)
            torch.testing.assert_close(batch.conditions["cell_type"], want.conditions["cell_type"], rtol=0, atol=0)


def test_group_buffers_reads_more_buffers_per_group_in_narrower_reads_with_the_same_stream(
    train_cells, soma_experiment, monkeypatch
):
    # data.group_buffers=k: groups of n_workers x k buffers, each worker's range read as k TileDB reads.
    # The stream is the same batches as k=1 (the global order does not depend on it), with 0 and 2 workers.
    marker = soma_experiment.marker_column
    reads = []
    monkeypatch.setattr(train_cells, "read", _recording(train_cells.read, reads))
    in_process = _loader(train_cells, group_buffers=3)
    got = _take(in_process, in_process.limit(0) + 3, marker)
    # 14 buffers an epoch in groups of 3 (the last of 2): 3 reads a group, each a third of its cells.
    first_group = np.sort(np.concatenate(in_process.order(0).batches(np.arange(12))))
    assert [len(r) for r in reads[:3]] == [24, 24, 24]
    np.testing.assert_array_equal(np.concatenate(reads[:3]), first_group)
    reference = _loader(train_cells)
    want = _take(reference, len(got), marker)
    assert [b.tolist() for b in got] == [b.tolist() for b in want]
    # A checkpoint taken at k=1 resumes exactly under k=2 (k is not part of the order).
    resumed = _loader(train_cells, group_buffers=2)
    resumed.load_state_dict({**_loader(train_cells).state_dict(), "position": 7})
    assert [b.tolist() for b in _take(resumed, 10, marker)] == [b.tolist() for b in want[7:17]]
    loader = _loader(train_cells, num_workers=2, group_buffers=2)
    _assert_workers_read_disjoint_ranges(loader, 2)
    assert len(loader.reads(0, 0, 0, 2)) == -(-14 // 4)  # groups of 2 workers x 2 buffers
    joined = _joined(loader, 2, monkeypatch)
    assert [_joinids(b, marker).tolist() for b in joined] == [b.tolist() for b in want[: loader.limit(0)]]
    with pytest.raises(DataError, match="data.group_buffers must be >= 1"):
        _loader(train_cells, group_buffers=0)
    with pytest.raises(ConfigError, match="data.group_buffers must be >= 1"):
        load_config(None, ["data.group_buffers=0"])


def _recording(read, calls: list):
    def recorded(positions):
        calls.append(np.asarray(positions))
        return read(positions)

    return recorded


def test_workers_split_a_lone_buffer_and_yield_equal_items_per_epoch(train_cells, monkeypatch):
    # One buffer holds the whole split: 1 run per epoch. Both workers still read (each its range of it) and
    # yield one item per batch, so the DataLoader, which takes items from its workers in turn, never waits on
    # a worker with nothing to send.
    loader = _loader(train_cells, buffer_chunks=64, num_workers=2)
    _assert_workers_read_disjoint_ranges(loader, 2)
    per_worker = {
        w: list(itertools.islice(_worker_stream(loader, w, 2, monkeypatch), 3 * loader.limit(0))) for w in range(2)
    }
    for epoch in range(3):
        counts = [sum(1 for (e, _), _b in per_worker[w] if e == epoch) for w in range(2)]
        assert counts == [loader.limit(epoch)] * 2
    for w in range(2):
        assert sum(len(rows.positions) for _, rows in per_worker[w]) > 0


def test_resume_on_more_ranks_with_fewer_batches_left_than_ranks_starts_the_next_epoch(train_cells):
    old = _loader(train_cells, rank=0, world_size=2)
    # One batch left per old rank and the one the equal-steps rule drops: 3 batches for 4 new ranks.
    state = {**old.state_dict(), "position": old.limit(0) - 1}
    new = _loader(train_cells, rank=0, world_size=4)
    new.load_state_dict(state)
    assert (new.state_dict()["epoch"], new.state_dict()["position"]) == (1, 0)


def test_ranks_stream_disjoint_cells_in_equal_steps(train_cells, soma_experiment):
    marker = soma_experiment.marker_column
    per_rank = []
    for rank in range(2):
        loader = _loader(train_cells, rank=rank, world_size=2)
        assert loader.limit(0) == 26
        per_rank.append(np.concatenate(_take(loader, loader.limit(0), marker)))
    assert len(per_rank[0]) == len(per_rank[1])
    assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())


def test_the_global_order_does_not_depend_on_the_number_of_ranks(train_cells, soma_experiment):
    marker = soma_experiment.marker_column
    single = _loader(train_cells)
    whole = _take(single, 52, marker)
    halves = []
    for rank in range(2):
        loader = _loader(train_cells, rank=rank, world_size=2)
        halves += _take(loader, 26, marker)
    assert [b.tolist() for b in halves] == [b.tolist() for b in whole]


def test_two_spawned_workers_give_the_in_process_stream_also_when_resumed(train_cells, soma_experiment):
    # One test pays for spawning DataLoader workers (~8 s of imports): rank 1 of 2, resumed at batch 3.
    reference = _loader(train_cells, rank=1, world_size=2)
    limit = reference.limit(0)
    expected = [next(reference) for _ in range(limit)]
    loader = _loader(train_cells, rank=1, world_size=2, num_workers=2)
    loader.load_state_dict({**reference.state_dict(), "position": 3, "epoch": 0})
    got = [next(loader) for _ in range(limit - 3)]
    assert (loader.state_dict()["epoch"], loader.state_dict()["position"]) == (1, 0)  # the epoch is done
    assert next(loader).target.shape == expected[0].target.shape  # and the same workers go on into epoch 1
    for want, have in zip(expected[3:], got, strict=True):
        torch.testing.assert_close(have.target, want.target, rtol=0, atol=0)
        torch.testing.assert_close(have.conditions["cell_type"], want.conditions["cell_type"], rtol=0, atol=0)


# --- resume --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("consumed", ["mid_epoch", "two_before_the_end", "at_the_end"])
def test_resume_continues_with_exactly_the_remaining_batches(train_cells, soma_experiment, consumed):
    marker = soma_experiment.marker_column
    loader = _loader(train_cells, seed=5, rank=0, world_size=2)
    limit = loader.limit(0)
    k = {"mid_epoch": 5, "two_before_the_end": limit - 2, "at_the_end": limit}[consumed]
    _take(loader, k, marker)
    state = loader.state_dict()
    # A finished epoch is stored as the next one's start.
    want = (1, 0) if k == limit else (0, k)
    assert (state["epoch"], state["position"], state["seed"], state["world_size"]) == (*want, 5, 2)
    remaining = _take(loader, 6, marker)  # crosses into epoch 1 for the last two cases

    resumed = _loader(train_cells, seed=0, rank=0, world_size=2)  # the state's seed wins
    resumed.load_state_dict(state)
    assert [b.tolist() for b in _take(resumed, 6, marker)] == [b.tolist() for b in remaining]


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 1), (2, 3), (1, 2)])
def test_resume_on_another_number_of_ranks_reads_exactly_the_cells_left(
    train_cells, soma_experiment, old_world, new_world
):
    marker = soma_experiment.marker_column
    consumed, states = [], []
    for rank in range(old_world):
        loader = _loader(train_cells, seed=3, rank=rank, world_size=old_world)
        consumed += _take(loader, 7, marker)
        states.append(loader.state_dict())
    resumed = [_loader(train_cells, seed=0, rank=r, world_size=new_world) for r in range(new_world)]
    for loader in resumed:
        loader.load_state_dict(states[0])  # every rank saved the same state
    limit = resumed[0].limit(0)
    assert all(loader.limit(0) == limit for loader in resumed)
    rest = [b for loader in resumed for b in _take(loader, limit, marker)]
    seen = np.concatenate(consumed + rest)
    assert len(np.unique(seen)) == len(seen)  # nothing read twice in the epoch
    # Everything the epoch had left is read, except fewer batches than ranks (the equal-steps remainder).
    assert 53 * 6 - len(seen) < new_world * 6
    # Then epoch 1 is the usual epoch 1 of new_world ranks.
    fresh = _loader(train_cells, seed=3, rank=0, world_size=new_world)
    fresh.load_state_dict({**fresh.state_dict(), "epoch": 1, "position": 0})
    assert [b.tolist() for b in _take(resumed[0], 3, marker)] == [b.tolist() for b in _take(fresh, 3, marker)]


def test_resume_with_other_plan_sizes_is_refused(train_cells):
    state = _loader(train_cells, rank=0, world_size=2).state_dict()
    with pytest.raises(DataError, match="batch_size 6 -> 4"):
        _loader(train_cells, rank=0, world_size=2, batch_size=4).load_state_dict(state)


# --- multi-process: rank and world size from torch.distributed ------------------------------------------

RANK_SCRIPT = """
import json
import sys

import numpy as np
import torch.distributed as dist

from scldm_scale.data.soma import SomaBatches, SomaCells, SomaSpec


def main():
    uri, marker, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    cells = SomaCells(SomaSpec(uri, obs_filter="split == 'train'"))
    workers = int(sys.argv[4])
    batches = SomaBatches(cells, {}, batch_size=6, seed=0, chunk_size=8, buffer_chunks=3, num_workers=workers)
    joinids = []
    for _ in range(batches.limit(0)):
        joinids.append((next(batches).target[:, marker].numpy().astype(np.int64) - 1).tolist())
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump({"rank": batches.rank, "world_size": batches.world_size, "batches": joinids}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
"""


@pytest.mark.multiproc
def test_torchrun_2_ranks_x_2_workers_read_disjoint_cells_in_equal_steps(train_cells, soma_experiment, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    command += [soma_experiment.uri, str(soma_experiment.marker_column), str(tmp_path), "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) > 0
    cells = [np.concatenate(r["batches"]) for r in ranks]
    assert not set(cells[0].tolist()) & set(cells[1].tolist())
    # The union is the epoch's global order but for the one batch the equal-steps rule drops.
    assert len(np.concatenate(cells)) == 52 * 6
    for rank, got in enumerate(ranks):  # the same stream as a loader told its rank explicitly
        loader = SomaBatches(train_cells, {}, seed=0, rank=rank, world_size=2, **PLAN)
        want = _take(loader, loader.limit(0), soma_experiment.marker_column)
        assert got["batches"] == [b.tolist() for b in want]


# --- vocabulary alignment ------------------------------------------------------------------------------


def test_a_model_vocabulary_maps_the_experiment_genes_by_id(soma_experiment):
    exp = soma_experiment
    rng = np.random.default_rng(0)
    subset = [exp.gene_ids[j] for j in rng.permutation(len(exp.gene_ids))[:25]]
    vocabulary = [*subset[:10], "gene_not_in_the_experiment", *subset[10:]]
    cells = SomaCells(SomaSpec(exp.uri, obs_filter=TRAIN), vocabulary=vocabulary)
    assert cells.vocabulary.ids == vocabulary
    present = [i for i, g in enumerate(vocabulary) if g in exp.gene_ids]
    np.testing.assert_array_equal(cells.decode_gene_ids, present)

    positions = np.arange(0, 320, 7)
    source_columns = [exp.gene_ids.index(vocabulary[i]) for i in cells.decode_gene_ids]
    expected = exp.counts[cells.joinids[positions]][:, source_columns]  # (P, 25)
    np.testing.assert_array_equal(cells.read(positions).toarray(), expected)

    batch = next(SomaBatches(cells, {}, seed=0, **PLAN))
    np.testing.assert_array_equal(batch.decode_gene_ids.numpy(), present)
    for row in range(batch.size):  # every token names a vocabulary gene and carries that gene's count
        genes = batch.gene_ids[row][batch.mask[row]].numpy()
        target = dict(zip(batch.decode_gene_ids.tolist(), batch.target[row].tolist(), strict=True))
        assert [target[g] for g in genes] == batch.counts[row][batch.mask[row]].tolist()


def test_a_model_vocabulary_with_other_ids_maps_the_experiment_genes_by_feature_name(soma_experiment):
    exp = soma_experiment
    names = exp.gene_ids[::-1][:20]  # the fixture's feature_name is its feature_id
    vocabulary = GeneVocabulary([f"ENSG{i:03d}" for i in range(len(names))], names)
    cells = SomaCells(SomaSpec(exp.uri, obs_filter=TRAIN), vocabulary=vocabulary)
    assert cells.alignment.matched_by == "name" and cells.vocabulary == vocabulary
    np.testing.assert_array_equal(cells.decode_gene_ids, np.arange(20))
    positions = np.arange(0, 320, 11)
    source_columns = [exp.gene_ids.index(g) for g in names]
    expected = exp.counts[cells.joinids[positions]][:, source_columns]  # (P, 20)
    np.testing.assert_array_equal(cells.read(positions).toarray(), expected)


def test_a_vocabulary_without_overlap_is_refused(soma_experiment):
    with pytest.raises(DataError, match="none of its genes are in the model's vocabulary"):
        SomaCells(SomaSpec(soma_experiment.uri), vocabulary=["other_0", "other_1"])


def test_missing_experiment_layer_or_condition_key_is_refused(soma_experiment, tmp_path):
    with pytest.raises(DataError, match="cannot open SOMA experiment .*scldm-scale prepare"):
        SomaCells(SomaSpec(str(tmp_path / "nothing.soma")))
    with pytest.raises(DataError, match="no X layer 'raw'; layers are \\['counts'\\]"):
        SomaCells(SomaSpec(soma_experiment.uri, layer="raw"))
    with pytest.raises(DataError, match="condition keys \\['tissue'\\] are not obs columns"):
        SomaCells(SomaSpec(soma_experiment.uri, condition_keys=["tissue"]))
    with pytest.raises(DataError, match="no cells match"):
        SomaCells(SomaSpec(soma_experiment.uri, obs_filter="split == 'val'"))


# --- Census-shaped local collection -------------------------------------------------------------------


@pytest.fixture
def local_census(marked_counts_adata, tmp_path):
    """census/{census_info, census_data/homo_sapiens}: 90 cells, layer `raw`, raw_sum = row sum + 1000."""
    adata = marked_counts_adata(n_cells=90, n_genes=30)
    n_cells = adata.n_obs
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs["tissue_general"] = np.where(np.arange(n_cells) % 3 == 0, "blood", "lung")
    adata.obs["is_primary_data"] = np.arange(n_cells) % 5 != 0
    # The Census's raw_sum counts genes a var_filter may leave out; +1000 tells it apart from the row sum.
    adata.obs["raw_sum"] = np.asarray(adata.X.sum(axis=1)).ravel() + 1000.0
    adata.var["feature_id"] = adata.var_names.to_numpy()
    adata.var["feature_name"] = [f"SYM{j}" for j in range(adata.n_vars)]
    root = tmp_path / "census"
    census_collection(root)
    tiledbsoma.io.from_anndata(str(experiment_path(root)), adata, "RNA", X_layer_name="raw")
    link_experiment(root)
    return root, adata


def test_census_collection_streams_only_matching_cells_from_raw(local_census):
    root, adata = local_census
    cfg = DataConfig(
        source="census",
        uri=str(root),
        obs_filter="is_primary_data == True and tissue_general == 'lung'",
        condition_keys=["cell_type"],
        split_key="split",
        chunk_size=8,
        buffer_chunks=2,
    )
    cells = open_train_cells(cfg, batch_size=4, seed=0)
    obs = adata.obs
    matching = np.flatnonzero(obs["is_primary_data"].to_numpy() & (obs["tissue_general"] == "lung").to_numpy())
    assert cells.n_cells == len(matching) == 48
    assert cells.batches.cells.spec.layer == "raw"  # the default for the Census; "counts" does not exist here
    np.testing.assert_array_equal(cells.library_sizes, obs["raw_sum"].to_numpy()[matching])
    np.testing.assert_array_equal(cells.labels["cell_type"], obs["cell_type"].to_numpy(dtype=str)[matching])

    marker = adata.n_vars - 1
    dense = adata.X.toarray()
    seen = []
    for _ in range(cells.batches.limit(0)):
        batch = next(cells.batches)
        joinids = _joinids(batch, marker)
        np.testing.assert_array_equal(batch.target.numpy(), dense[joinids])
        seen.extend(joinids.tolist())
    # 48 cells = 6 chunks = 3 buffers of 16 cells = 12 batches of 4: one epoch streams every matching cell once.
    assert sorted(seen) == matching.tolist()


def test_census_without_the_organism_is_refused(local_census):
    root, _ = local_census
    with pytest.raises(DataError, match="no organism 'mus_musculus'"):
        SomaCells(SomaSpec(str(root), layer="raw", census=True, organism="mus_musculus"))


# --- open_train_cells and the config -------------------------------------------------------------------


def test_open_train_cells_reads_the_train_split_of_a_soma_experiment(soma_experiment):
    exp = soma_experiment
    cfg = DataConfig(source="soma", uri=exp.uri, condition_keys=["cell_type"], chunk_size=8, buffer_chunks=3)
    cells = open_train_cells(cfg, batch_size=6, seed=0)
    train = np.flatnonzero(exp.split == "train")
    assert cells.n_cells == len(train)
    assert cells.gene_names == exp.gene_ids
    np.testing.assert_array_equal(cells.library_sizes, exp.counts[train].sum(axis=1))
    ordered = np.concatenate([_joinids(b, exp.marker_column) for b in cells.ordered()])
    np.testing.assert_array_equal(ordered, train)
    np.testing.assert_array_equal(
        cells.condition_ids["cell_type"], cells.encoders["cell_type"].encode(exp.cell_type[train])
    )


def test_soma_source_without_uri_is_refused():
    with pytest.raises(DataError, match="data.source=soma needs data.uri"):
        open_train_cells(DataConfig(source="soma", uri=None, condition_keys=[]), batch_size=4, seed=0)


def test_data_path_with_the_soma_source_is_a_config_error():
    with pytest.raises(ConfigError, match="data.path is read by data.source=h5ad, but data.source=soma"):
        load_config(overrides=["data.source=soma", "data.path=cells.h5ad"])


def test_with_a_var_filter_library_sizes_are_totals_over_the_genes_read(soma_experiment):
    """obs n_counts totals every gene; a model trained on a gene subset needs the subset's totals."""
    exp = soma_experiment
    kept = exp.gene_ids[:10]
    quoted = ", ".join(f"'{g}'" for g in kept)
    cfg = DataConfig(uri=exp.uri, condition_keys=["cell_type"], var_filter=f"feature_id in [{quoted}]")
    cells = open_train_cells(cfg, batch_size=8, seed=0)
    train = np.flatnonzero(exp.split == "train")
    assert cells.gene_names == kept
    np.testing.assert_allclose(cells.library_sizes, exp.counts[train][:, :10].sum(axis=1))
    assert not np.allclose(cells.library_sizes, exp.counts[train].sum(axis=1))
