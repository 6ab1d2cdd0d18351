"""`scldm-scale bench loader`: our SOMA loader (SomaBatches) against tiledbsoma-ml 0.1.0 on a synthetic experiment.

What is unusual here:
- The experiment imitates an atlas: cells come in "samples" (a few thousand cells each, their own cell-type
  mixture), and within a sample the cells are sorted by cell type, as concatenated annotated h5ads are. Cell
  types are therefore clustered along soma_joinid, which is what makes shuffle quality measurable: a loader
  that reads contiguous runs of cells yields batches of few cell types.
- Every (loader, worker count) is measured in a fresh spawned process, so numba / import costs fall into its
  own warm-up and its peak RSS is its own. That peak is VmHWM, not ru_maxrss: Linux carries ru_maxrss across
  fork + exec, so a spawned child would report at least its parent's RSS. DataLoader workers are spawned
  processes too (this module has no import-time side effects); their summed RSS is sampled every 0.25 s.
- Throughput is cells/s over a window after `warmup_batches`: it includes epoch ends, where both loaders
  start new (non-persistent) DataLoader workers, because training pays for those too.
- Shuffle score = mean total-variation distance between each measured batch's cell-type composition and the
  global one (0 = every batch looks like the whole experiment); the `random_permutation` row is the floor a
  full shuffle reaches at this batch size.
- tiledbsoma-ml runs as documented (ExperimentDataset + experiment_dataloader), shuffle_chunk_size equal to
  our chunk_size (64, also its default) and its default io_batch_size (65,536 cells per read, shuffled
  together). Forcing io_batch_size down to our 512-cell buffer makes it several times slower (one full
  gc.collect and a small read per IO batch), so that would not be the baseline users see.
- `--uri` measures an existing experiment instead: a SOMA experiment (`scldm-scale prepare`, X layer
  `counts`) or a Census-shaped collection (`scldm-scale synthetic-census`, X layer `raw`; ours reads it
  through the census source, tiledbsoma-ml opens its `census_data/homo_sapiens` experiment), at its full
  gene vocabulary, with its obs `cell_type` as the shuffle label.
- `--cells-per-read N` sets both loaders' read size (our buffer, tiledbsoma-ml's io_batch_size) to N cells:
  at the Census's ~1.5k non-zeros per cell a 65,536-cell read is ~100M non-zeros (GBs per process).
- `--group-buffers K` is ours only (`data.group_buffers`): each of our loader processes reads K buffers per
  group, as K reads of about one buffer, so a TileDB read stays --cells-per-read cells.
- `--repeats R` runs the cases R times, interleaved (tiledbsoma-ml, ours, tiledbsoma-ml, ours, ...), and
  prints each pair's ratio and their median: on a shared machine one pair's ratio moves with the load.
- CPU s / 1k cells = the measuring process's and its DataLoader workers' CPU time over the window, per 1,000
  cells: less sensitive to other jobs than cells/s (though not immune: contention slows each instruction).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import multiprocessing
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from scldm_scale.bench.records import claim_records, machine, write_records
from scldm_scale.config import ConfigError, DataConfig, parse_ints
from scldm_scale.data.soma import SomaSpec
from scldm_scale.outputs import add_overwrite

MEASUREMENT = "RNA"
X_LAYER = "counts"
LABEL = "cell_type"
N_CELL_TYPES = 8
GENERATOR_VERSION = 1  # part of the experiment's folder name: a changed generator never reuses an old experiment
ROWS_PER_CHUNK = 5_000  # cells generated and written at once: bounds the build's memory (~5,000 x n_genes x 8 B)

# Our loader's shuffle settings (the data config defaults); tiledbsoma-ml gets the same shuffle chunk size.
CHUNK_SIZE = DataConfig().chunk_size
BUFFER_CHUNKS = DataConfig().buffer_chunks
TILEDBSOMA_ML_IO_BATCH = 65_536  # tiledbsoma-ml 0.1.0's default io_batch_size, left as it is

OURS = "scldm_scale"
BASELINE = "tiledbsoma_ml"
RANDOM = "random_permutation"
RSS_SAMPLE_S = 0.25
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Timing:
    """How long each (loader, workers) case runs: warm-up batches are discarded, then the clock runs until
    `measure_s` seconds or `max_batches` batches, whichever comes first."""

    warmup_batches: int = 10
    measure_s: float = 12.0
    max_batches: int = 2_000


# --- the synthetic experiment ---------------------------------------------------------------------------------


@dataclass
class SyntheticDesign:
    cell_types: np.ndarray  # (N,) int, cell-type code of each cell, clustered along the cell order
    library_sizes: np.ndarray  # (N,) float, expected total counts of each cell
    profiles: np.ndarray  # (T, G) float, each type's expression proportions (rows sum to 1)
    theta: float  # NB inverse dispersion, shared by all genes


def synthetic_design(n_cells: int, n_genes: int, seed: int) -> SyntheticDesign:
    """Cell types in sample blocks, lognormal library sizes, per-type NB mean profiles (~10% non-zeros)."""
    rng = np.random.default_rng([seed, 0])
    global_mix = rng.dirichlet(np.full(N_CELL_TYPES, 2.0))  # some types common, some rare
    blocks = []
    while sum(len(b) for b in blocks) < n_cells:
        size = int(rng.lognormal(np.log(2_000), 0.5)) + 1
        mix = rng.dirichlet(5.0 * global_mix)  # each sample has its own composition
        blocks.append(np.sort(rng.choice(N_CELL_TYPES, size=size, p=mix)))
    cell_types = np.concatenate(blocks)[:n_cells]
    # Gene proportions are heavy-tailed (a few genes take most counts); each type shifts every gene a little
    # and ~3% of genes (its markers) a lot.
    base = rng.lognormal(0.0, 1.8, size=n_genes)
    log_fold = rng.normal(0.0, 0.6, size=(N_CELL_TYPES, n_genes))  # (T, G)
    log_fold += (rng.random((N_CELL_TYPES, n_genes)) < 0.03) * rng.normal(2.0, 0.5, size=(N_CELL_TYPES, n_genes))
    profiles = base * np.exp(log_fold)  # (T, G)
    profiles /= profiles.sum(axis=1, keepdims=True)
    # A median of 500 counts over 2,000 genes with theta = 0.5 gives ~10% non-zeros; scale with the gene count.
    median_library = 500.0 * n_genes / 2_000
    library_sizes = rng.lognormal(np.log(median_library), 0.5, size=n_cells)
    return SyntheticDesign(cell_types=cell_types, library_sizes=library_sizes, profiles=profiles, theta=0.5)


def synthetic_chunk(design: SyntheticDesign, start: int, stop: int, seed: int) -> sp.csr_matrix:
    """NB counts of cells start..stop-1 (int32 CSR); an empty cell gets one count in its type's top gene."""
    rng = np.random.default_rng([seed, 1, start])
    types = design.cell_types[start:stop]
    mu = design.library_sizes[start:stop, None] * design.profiles[types]  # (n, G)
    theta = design.theta
    counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.int32)  # mean theta (1 - p) / p = mu
    empty = np.flatnonzero(counts.sum(axis=1) == 0)
    counts[empty, design.profiles[types[empty]].argmax(axis=1)] = 1
    return sp.csr_matrix(counts)


def type_names() -> list[str]:
    return [f"type_{t}" for t in range(N_CELL_TYPES)]


def experiment_uri(work_dir: str | Path, n_cells: int, n_genes: int, seed: int) -> Path:
    return Path(work_dir) / f"synthetic_{n_cells}x{n_genes}_seed{seed}_v{GENERATOR_VERSION}"


def build_experiment(uri: str | Path, n_cells: int, n_genes: int, seed: int) -> Path:
    """Write the synthetic experiment at uri in chunks of ROWS_PER_CHUNK cells, unless it exists already.

    The first chunk creates the experiment with tiledbsoma.io.from_anndata, the others are appended to it
    (register_anndatas + prepare_experiment + from_anndata); obs has `cell_type` and `n_counts`, var
    `feature_id`, X layer `counts` is int32, as `scldm-scale prepare` writes. The build happens in a
    staging folder renamed onto uri at the end, so an interrupted build is never reused.
    """
    import tiledbsoma.io

    uri = Path(uri)
    if uri.exists():
        return uri
    uri.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{uri.name}.", suffix=".partial", dir=uri.parent))
    exp_uri = str(staging / "exp")
    design = synthetic_design(n_cells, n_genes, seed)
    names = type_names()
    var = pd.DataFrame(index=[f"gene_{j:05d}" for j in range(n_genes)])
    var["feature_id"] = var.index.to_numpy()
    try:
        for start in tqdm(range(0, n_cells, ROWS_PER_CHUNK), desc="build experiment", unit="chunk"):
            stop = min(start + ROWS_PER_CHUNK, n_cells)
            counts = synthetic_chunk(design, start, stop, seed)
            obs = pd.DataFrame(
                {
                    LABEL: pd.Categorical.from_codes(design.cell_types[start:stop], categories=names),
                    "n_counts": np.asarray(counts.sum(axis=1), dtype=np.float64).ravel(),
                },
                index=[f"cell_{i}" for i in range(start, stop)],
            )
            adata = ad.AnnData(X=counts, obs=obs, var=var)
            kwargs = {"X_layer_name": X_LAYER, "obs_id_name": "obs_id", "var_id_name": "var_id"}
            if start == 0:
                tiledbsoma.io.from_anndata(exp_uri, adata, MEASUREMENT, **kwargs)
            else:
                mapping = tiledbsoma.io.register_anndatas(
                    exp_uri, [adata], measurement_name=MEASUREMENT, obs_field_name="obs_id", var_field_name="var_id"
                )
                mapping.prepare_experiment(exp_uri)
                tiledbsoma.io.from_anndata(exp_uri, adata, MEASUREMENT, registration_mapping=mapping, **kwargs)
        (staging / "exp").rename(uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return uri


@dataclass(frozen=True)
class BenchData:
    """Where both loaders read: `spec` for ours, the Experiment at `experiment_uri` for tiledbsoma-ml."""

    spec: SomaSpec
    experiment_uri: str
    type_names: tuple[str, ...]  # the LABEL values, in code order

    @property
    def layer(self) -> str:
        return self.spec.layer


def synthetic_data(uri: str | Path) -> BenchData:
    return BenchData(SomaSpec(str(uri), X_LAYER, condition_keys=[LABEL]), str(uri), tuple(type_names()))


def existing_data(uri: str | Path) -> BenchData:
    """An experiment of `prepare`, or a Census-shaped collection (it has census_data/homo_sapiens)."""
    import tiledbsoma

    census = (Path(uri) / "census_data").is_dir()
    spec = SomaSpec(str(uri), "raw" if census else X_LAYER, census=census, condition_keys=[LABEL])
    experiment_uri = str(Path(uri) / "census_data" / spec.organism) if census else str(uri)
    with tiledbsoma.Experiment.open(experiment_uri) as exp:
        labels = exp.obs.read(column_names=[LABEL]).concat().column(LABEL).to_pandas()
    return BenchData(spec, experiment_uri, tuple(sorted(labels.astype(str).unique())))


def read_cell_types(data: BenchData) -> np.ndarray:
    """Cell-type code (index into data.type_names) of every cell, indexed by soma_joinid."""
    import tiledbsoma

    with tiledbsoma.Experiment.open(data.experiment_uri) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", LABEL]).concat().to_pandas()
    codes = np.full(int(obs["soma_joinid"].max()) + 1, -1, dtype=np.int64)
    codes[obs["soma_joinid"].to_numpy()] = pd.Categorical(obs[LABEL].astype(str), categories=data.type_names).codes
    return codes


def experiment_shape(data: BenchData) -> tuple[int, int]:
    import tiledbsoma

    with tiledbsoma.Experiment.open(data.experiment_uri) as exp:
        return exp.obs.count, exp.ms[MEASUREMENT].var.count


# --- shuffle quality --------------------------------------------------------------------------------------


def type_counts(codes: np.ndarray, n_types: int = N_CELL_TYPES) -> np.ndarray:
    return np.bincount(codes, minlength=n_types)


def shuffle_score(batch_type_counts: np.ndarray, global_fraction: np.ndarray) -> float:
    """Mean over batches of the total-variation distance between a batch's and the global composition."""
    fractions = batch_type_counts / batch_type_counts.sum(axis=1, keepdims=True)  # (B, T)
    return float(0.5 * np.abs(fractions - global_fraction).sum(axis=1).mean())


def random_permutation_counts(codes: np.ndarray, batch_size: int, seed: int, n_types: int = N_CELL_TYPES) -> np.ndarray:
    """(B, T) cell-type counts of the full batches of one uniformly random permutation of all cells."""
    order = np.random.default_rng([seed, 2]).permutation(len(codes))
    n_batches = len(codes) // batch_size
    batches = codes[order[: n_batches * batch_size]].reshape(n_batches, batch_size)  # (B, batch_size)
    return np.stack([type_counts(b, n_types) for b in batches])


# --- the loaders, each as a stream of (cell-type codes, epoch) per batch ----------------------------------


def _ours(
    data: BenchData, batch_size: int, seed: int, num_workers: int, cells_per_read: int, group_buffers: int = 1
) -> Iterator[tuple[np.ndarray, int]]:
    from scldm_scale.data.batch import LabelEncoder
    from scldm_scale.data.soma import SomaBatches, SomaCells

    cells = SomaCells(data.spec)
    encoders = {LABEL: LabelEncoder(LABEL, list(data.type_names))}  # ids are then type codes
    batches = SomaBatches(
        cells,
        encoders,
        batch_size,
        seed,
        chunk_size=CHUNK_SIZE,
        buffer_chunks=cells_per_read // CHUNK_SIZE,
        num_workers=num_workers,
        rank=0,
        world_size=1,
        group_buffers=group_buffers,
    )
    for batch in batches:
        yield batch.conditions[LABEL].numpy(), batches.epoch


def _tiledbsoma_ml(
    data: BenchData, batch_size: int, seed: int, num_workers: int, cells_per_read: int, codes_by_joinid: np.ndarray
) -> Iterator[tuple[np.ndarray, int]]:
    import tiledbsoma
    import tiledbsoma_ml

    with tiledbsoma.Experiment.open(data.experiment_uri) as exp, exp.axis_query(MEASUREMENT) as query:
        dataset = tiledbsoma_ml.ExperimentDataset(
            query,
            layer_name=data.layer,
            batch_size=batch_size,
            io_batch_size=cells_per_read,
            shuffle=True,
            shuffle_chunk_size=CHUNK_SIZE,
            seed=seed,
        )
    loader = tiledbsoma_ml.experiment_dataloader(dataset, num_workers=num_workers)
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        for _x, obs in loader:
            yield codes_by_joinid[obs["soma_joinid"].to_numpy()], epoch


# --- memory -----------------------------------------------------------------------------------------------


def _status_mb(pid: int | str, field: str) -> float | None:
    """A memory field (VmRSS, VmHWM) of /proc/PID/status in MB; None without /proc or once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _process_peak_rss_mb() -> float:
    peak = _status_mb("self", "VmHWM")
    if peak is None:  # no /proc (macOS): ru_maxrss, in bytes there
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return peak


def _cpu_s(pid: int | str) -> float:
    """User + system CPU seconds of a process so far (0 once it is gone, or without /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


def _spawned_children() -> list[int]:
    """Pids of this process's multiprocessing-spawned children (DataLoader workers, not the resource tracker)."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
            except OSError:
                continue
    return pids


class WorkerRssSampler:
    """Peak over time of the summed RSS of this process's DataLoader workers, sampled in a thread.

    Shared pages (torch's libraries) count once per worker, so the sum overstates what they take together.
    """

    def __init__(self, interval_s: float = RSS_SAMPLE_S):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            total = sum(_status_mb(pid, "VmRSS") or 0.0 for pid in _spawned_children())
            self.peak_mb = max(self.peak_mb, total)

    def __enter__(self) -> WorkerRssSampler:
        if Path("/proc/self/task").is_dir():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# --- one measurement ----------------------------------------------------------------------------------------


def measure(
    loader: str,
    data: BenchData,
    batch_size: int,
    seed: int,
    num_workers: int,
    timing: Timing,
    codes_by_joinid: np.ndarray,
    cells_per_read: dict[str, int],
    group_buffers: int = 1,
) -> dict:
    """Run one loader in this process: cells/s after warm-up, per-batch cell-type counts, peak RSS, and the CPU
    seconds of this process and its DataLoader workers over the window."""
    n_types = len(data.type_names)
    with WorkerRssSampler() as workers_rss:
        if loader == OURS:
            stream = _ours(data, batch_size, seed, num_workers, cells_per_read[OURS], group_buffers)
        else:
            stream = _tiledbsoma_ml(data, batch_size, seed, num_workers, cells_per_read[BASELINE], codes_by_joinid)
        for _ in range(timing.warmup_batches):
            next(stream)
        counts, epochs = [], []
        workers = _spawned_children()  # tiledbsoma-ml's workers restart every epoch: count those seen at the end
        cpu_start = time.process_time(), {pid: _cpu_s(pid) for pid in workers}
        start = time.perf_counter()
        while True:
            codes, epoch = next(stream)
            counts.append(type_counts(codes, n_types))
            epochs.append(epoch)
            elapsed = time.perf_counter() - start
            if elapsed >= timing.measure_s or len(counts) >= timing.max_batches:
                break
        workers_cpu = sum(_cpu_s(pid) - cpu_start[1].get(pid, 0.0) for pid in _spawned_children())
        main_cpu = time.process_time() - cpu_start[0]
        stream.close()
        gc.collect()  # SomaBatches holds its stream in a reference cycle: collect it to stop its workers now
    batch_counts = np.stack(counts)
    return {
        "cells_per_s": float(batch_counts.sum() / elapsed),
        "n_batches_measured": len(counts),
        "measured_s": elapsed,
        "epochs_started_while_measured": epochs[-1] - epochs[0],
        "batch_type_counts": batch_counts,
        "peak_rss_mb": _process_peak_rss_mb(),
        "workers_peak_rss_mb": workers_rss.peak_mb if num_workers > 0 else None,
        "main_cpu_s": main_cpu,
        "workers_cpu_s": workers_cpu,
    }


def _measure_in_fresh_process(*args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


# --- the report -------------------------------------------------------------------------------------------


def _format_table(records: list[dict]) -> str:
    header = (
        f"{'loader':<20} {'rep':>3} {'workers':>7} {'cells/s':>9} {'x tsml':>7} {'CPU s/1k':>8} {'window s':>8} "
        f"{'epoch ends':>10} {'RSS main MB':>11} {'RSS workers MB':>14} {'shuffle TV':>10}"
    )
    lines = [header, "-" * len(header)]

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in records:
        lines.append(
            f"{r['loader']:<20} {fmt(r.get('repeat'), 'd'):>3} {fmt(r['num_workers'], 'd'):>7} "
            f"{fmt(r['cells_per_s'], ',.0f'):>9} {fmt(r.get('ratio_vs_tiledbsoma_ml'), '.2f'):>7} "
            f"{fmt(r.get('cpu_s_per_1k_cells'), '.3f'):>8} {fmt(r.get('measured_s'), '.1f'):>8} "
            f"{fmt(r.get('epochs_started_while_measured'), 'd'):>10} {fmt(r['peak_rss_mb'], ',.0f'):>11} "
            f"{fmt(r['workers_peak_rss_mb'], ',.0f'):>14} {r['shuffle_score']:>10.3f}"
        )
    return "\n".join(lines)


def run_loader_bench(
    n_cells: int,
    n_genes: int,
    batch_size: int,
    workers: list[int],
    json_path: str | None,
    work_dir: str | None,
    seed: int,
    timing: Timing | None = None,
    isolate: bool = True,
    uri: str | None = None,
    cells_per_read: int | None = None,
    group_buffers: int = 1,
    repeats: int = 1,
) -> list[dict]:
    """Build (or reuse) the synthetic experiment, or read the existing one at `uri` (n_cells and n_genes are
    then its own), measure every (loader, workers) case, print the table. `cells_per_read` sets both
    loaders' read size (default: ours CHUNK_SIZE x BUFFER_CHUNKS, tiledbsoma-ml its io_batch_size).

    `group_buffers` is ours only (data.group_buffers). `repeats` runs every case that many times, interleaved
    (tiledbsoma-ml, ours, tiledbsoma-ml, ours, ...); each of our records' ratio is to tiledbsoma-ml's record
    of the same repeat and worker count.

    isolate=False measures in this process (saves a process start and numba JIT per case, for tests); the
    main peak RSS is then the whole run's, not a case's own.
    """
    if cells_per_read is not None and (cells_per_read < CHUNK_SIZE or cells_per_read % CHUNK_SIZE):
        raise ConfigError(
            f"--cells-per-read must be a positive multiple of {CHUNK_SIZE} (the shuffle chunk), got {cells_per_read}"
        )
    if group_buffers < 1 or repeats < 1:
        raise ConfigError(f"--group-buffers and --repeats must be >= 1, got {group_buffers} and {repeats}")
    timing = timing or Timing()
    run_case = _measure_in_fresh_process if isolate else measure
    host = machine()
    temp_dir = tempfile.mkdtemp(prefix="scldm_bench_loader_") if work_dir is None and uri is None else None
    try:
        if uri is None:
            synthetic = experiment_uri(work_dir or temp_dir, n_cells, n_genes, seed)
            data = synthetic_data(build_experiment(synthetic, n_cells, n_genes, seed))
        else:
            data = existing_data(uri)
            n_cells, n_genes = experiment_shape(data)
        n_types = len(data.type_names)
        codes_by_joinid = read_cell_types(data)
        global_fraction = type_counts(codes_by_joinid, n_types) / len(codes_by_joinid)
        common = {
            **host,
            "experiment": data.spec.uri if uri else "synthetic",
            "x_layer": data.layer,
            "n_cells": n_cells,
            "n_genes": n_genes,
            "batch_size": batch_size,
            "shuffle_chunk_size": CHUNK_SIZE,
            "peak_rss_scope": (
                "peak_rss_mb: VmHWM of "
                + ("a fresh process per case (includes torch/tiledbsoma imports)" if isolate else "the whole run")
                + f"; workers_peak_rss_mb: peak of the DataLoader workers' summed VmRSS, sampled every {RSS_SAMPLE_S} s"
            ),
        }
        reads = {
            OURS: cells_per_read or CHUNK_SIZE * BUFFER_CHUNKS,
            BASELINE: cells_per_read or TILEDBSOMA_ML_IO_BATCH,
        }
        settings = {
            OURS: {
                "buffer_chunks": reads[OURS] // CHUNK_SIZE,
                "cells_per_read": reads[OURS],
                "group_buffers": group_buffers,
            },
            BASELINE: {"io_batch_size": reads[BASELINE], "cells_per_read": reads[BASELINE]},
        }
        cases = [(r, w, loader) for r in range(repeats) for w in workers for loader in (BASELINE, OURS)]
        records = []
        for repeat, num_workers, loader in tqdm(cases, desc="measure loaders", unit="case"):
            load_start = _load_1m()
            result = run_case(
                loader, data, batch_size, seed, num_workers, timing, codes_by_joinid, reads, group_buffers
            )
            cells = int(result["batch_type_counts"].sum())
            records.append(
                {
                    "loader": loader,
                    "repeat": repeat,
                    "num_workers": num_workers,
                    "load_avg_1m_start": load_start,
                    "load_avg_1m_end": _load_1m(),
                    "main_cpu_s": result["main_cpu_s"],
                    "workers_cpu_s": result["workers_cpu_s"],
                    "cpu_s_per_1k_cells": 1000 * (result["main_cpu_s"] + result["workers_cpu_s"]) / cells,
                    "cells_per_s": result["cells_per_s"],
                    "peak_rss_mb": result["peak_rss_mb"],
                    "workers_peak_rss_mb": result["workers_peak_rss_mb"],
                    "shuffle_score": shuffle_score(result["batch_type_counts"], global_fraction),
                    "n_batches_measured": result["n_batches_measured"],
                    "measured_s": result["measured_s"],
                    "epochs_started_while_measured": result["epochs_started_while_measured"],
                    **settings[loader],
                    **common,
                }
            )
        baseline = {(r["repeat"], r["num_workers"]): r["cells_per_s"] for r in records if r["loader"] == BASELINE}
        for r in records:
            if r["loader"] == OURS:
                r["ratio_vs_tiledbsoma_ml"] = r["cells_per_s"] / baseline[r["repeat"], r["num_workers"]]
        reference = random_permutation_counts(codes_by_joinid, batch_size, seed, n_types)
        records.append(
            {
                "loader": RANDOM,
                "num_workers": None,
                "cells_per_s": None,
                "peak_rss_mb": None,
                "workers_peak_rss_mb": None,
                "shuffle_score": shuffle_score(reference, global_fraction),
                **common,
            }
        )
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)

    load = "n/a" if host["load_avg_1m"] is None else f"{host['load_avg_1m']:.2f}"
    print(
        f"\nloader benchmark ({uri or 'synthetic experiment'}, X layer {data.layer}): {n_cells:,} cells x "
        f"{n_genes:,} genes, batch {batch_size}, shuffle chunks of "
        f"{CHUNK_SIZE} cells; {host['platform']}, {host['cpu_count']} CPUs, load average {load} at start, "
        f"{host['date']}"
    )
    print(
        f"cells/s after {timing.warmup_batches} warm-up batches, over {timing.measure_s:g} s or {timing.max_batches} "
        "batches; x tsml = ours / tiledbsoma_ml at the same number of workers; window s = the measured time (a "
        "batch that arrives late stretches it); epoch ends = epochs started inside it (each restarts the workers)"
    )
    print(
        f"scldm_scale reads {reads[OURS]:,} cells at a time ({reads[OURS] // CHUNK_SIZE} chunks), tiledbsoma_ml "
        f"up to {reads[BASELINE]:,} (io_batch_size)"
    )
    print(
        "RSS main = peak (VmHWM) of the measuring process; RSS workers = peak of its DataLoader workers' summed "
        f"RSS, sampled every {RSS_SAMPLE_S} s"
    )
    print("shuffle TV = mean total-variation distance of batch vs global cell-type composition (lower is better)\n")
    print(_format_table(records))
    print()
    for line in _ratio_summary(records):
        print(line)
    write_records(records, json_path)
    return records


def _load_1m() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _ratio_summary(records: list[dict]) -> list[str]:
    """One line per worker count: ours / tiledbsoma-ml in each repeat, their median, and the CPU per 1k cells."""
    lines = []
    ours = [r for r in records if r["loader"] == OURS]
    for workers in dict.fromkeys(r["num_workers"] for r in ours):
        mine = [r for r in ours if r["num_workers"] == workers]
        theirs = [r for r in records if r["loader"] == BASELINE and r["num_workers"] == workers]
        ratios = [r["ratio_vs_tiledbsoma_ml"] for r in mine]
        cpu = np.median([r["cpu_s_per_1k_cells"] for r in theirs]) / np.median([r["cpu_s_per_1k_cells"] for r in mine])
        lines.append(
            f"ours / tiledbsoma-ml at {workers} workers: {', '.join(f'{x:.2f}x' for x in ratios)} (median "
            f"{np.median(ratios):.2f}x; CPU s per 1k cells, median: tiledbsoma-ml / ours = {cpu:.2f}x)"
        )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale bench loader`."""
    parser.add_argument("--cells", type=int, default=100_000, help="cells of the synthetic experiment")
    parser.add_argument("--genes", type=int, default=2_000, help="genes of the synthetic experiment")
    parser.add_argument("--batch-size", type=int, default=128, help="cells per batch")
    workers_help = "comma-separated DataLoader worker counts"
    parser.add_argument("--workers", default="0,2", help=workers_help)
    json_help = "also write the records to this JSON file (default: only print the table)"
    parser.add_argument("--json", default=None, help=json_help)
    parser.add_argument("--dir", default=None, help="where to build the experiment (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic cells and the shuffling")
    uri_help = (
        "measure this experiment instead (prepare's, or a Census-shaped one from synthetic-census; "
        "default: a synthetic one of --cells x --genes)"
    )
    parser.add_argument("--uri", default=None, help=uri_help)
    read_help = (
        f"cells per read of both loaders (default: ours {CHUNK_SIZE * BUFFER_CHUNKS:,}, tiledbsoma-ml's default)"
    )
    parser.add_argument("--cells-per-read", type=int, default=None, help=read_help)
    group_help = (
        "ours only (data.group_buffers): buffers each of our loader processes reads per group, as that many reads "
        "of about one buffer each"
    )
    parser.add_argument("--group-buffers", type=int, default=1, help=group_help)
    repeats_help = "run the cases this many times, interleaved, and print each pair's ratio and the median"
    parser.add_argument("--repeats", type=int, default=1, help=repeats_help)
    timing = Timing()
    parser.add_argument(
        "--warmup-batches", type=int, default=timing.warmup_batches, help="batches discarded before the clock starts"
    )
    parser.add_argument(
        "--seconds", type=float, default=timing.measure_s, help="measured window of each case, in seconds"
    )
    add_overwrite(parser, "the records file at --json")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    if min(args.cells, args.genes, args.batch_size) < 1:
        raise ConfigError(
            f"--cells, --genes and --batch-size must be >= 1, got {args.cells}, {args.genes} and {args.batch_size}"
        )
    if args.uri is not None and not Path(args.uri).is_dir():
        raise ConfigError(
            f"--uri {args.uri} is not a folder; pass a SOMA experiment (scldm-scale prepare) or a Census root "
            "(scldm-scale synthetic-census), or leave --uri out to measure a synthetic experiment"
        )
    if args.warmup_batches < 0 or not args.seconds > 0:
        raise ConfigError(
            f"--warmup-batches must be >= 0 and --seconds > 0, got {args.warmup_batches} and {args.seconds}"
        )
    claim_records(args.json, args.overwrite)
    workers = parse_ints(args.workers, "--workers")
    timing = Timing(warmup_batches=args.warmup_batches, measure_s=args.seconds, max_batches=Timing.max_batches)
    run_loader_bench(
        args.cells,
        args.genes,
        args.batch_size,
        workers,
        args.json,
        args.dir,
        args.seed,
        timing=timing,
        uri=args.uri,
        cells_per_read=args.cells_per_read,
        group_buffers=args.group_buffers,
        repeats=args.repeats,
    )
