"""`scldm-scale bench loader` end to end on a tiny experiment: the JSON records and their schema (no timings)."""

import json

import numpy as np
import pytest

from scldm_scale.bench.loader import (
    N_CELL_TYPES,
    Timing,
    build_experiment,
    experiment_uri,
    random_permutation_counts,
    run_loader_bench,
    shuffle_score,
)
from scldm_scale.config import ConfigError

MACHINE_KEYS = {"platform", "cpu_count", "date"}


def test_loader_bench_writes_one_record_per_case_and_a_random_reference(tmp_path):
    pytest.importorskip("tiledbsoma_ml")  # the `bench` extra
    json_path = tmp_path / "bench.json"
    timing = Timing(warmup_batches=2, measure_s=0.5, max_batches=8)
    run_loader_bench(
        n_cells=3000,
        n_genes=200,
        batch_size=64,
        workers=[0],
        json_path=str(json_path),
        work_dir=str(tmp_path),
        seed=0,
        timing=timing,
        isolate=False,
    )
    records = json.loads(json_path.read_text())
    by_loader = {r["loader"]: r for r in records}
    assert set(by_loader) == {"scldm_scale", "tiledbsoma_ml", "random_permutation"}
    for r in records:
        assert MACHINE_KEYS <= set(r) and r["cpu_count"] >= 1
        assert 0.0 <= r["shuffle_score"] <= 1.0
    for name in ("scldm_scale", "tiledbsoma_ml"):
        r = by_loader[name]
        assert r["num_workers"] == 0
        assert r["cells_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert 1 <= r["n_batches_measured"] <= timing.max_batches
    ours = by_loader["scldm_scale"]
    assert ours["ratio_vs_tiledbsoma_ml"] == pytest.approx(
        ours["cells_per_s"] / by_loader["tiledbsoma_ml"]["cells_per_s"]
    )
    reference = by_loader["random_permutation"]
    assert reference["num_workers"] is None and reference["cells_per_s"] is None
    # The experiment stays in work_dir under its parameters' name, and a later run reuses it as it is.
    uri = experiment_uri(tmp_path, 3000, 200, 0)
    written = uri.stat().st_mtime_ns
    assert build_experiment(uri, 3000, 200, 0) == uri and uri.stat().st_mtime_ns == written


def test_shuffle_score_is_zero_for_batches_like_the_whole_and_one_for_single_type_batches():
    global_fraction = np.full(N_CELL_TYPES, 1 / N_CELL_TYPES)
    assert shuffle_score(np.full((3, N_CELL_TYPES), 4), global_fraction) == pytest.approx(0.0)
    one_type = np.zeros((2, N_CELL_TYPES), dtype=int)
    one_type[:, 0] = 32
    assert shuffle_score(one_type, global_fraction) == pytest.approx(1 - 1 / N_CELL_TYPES)


def test_random_permutation_keeps_every_cell_once_per_full_batch():
    codes = np.repeat(np.arange(N_CELL_TYPES), 50)  # 400 cells, clustered by type
    counts = random_permutation_counts(codes, batch_size=64, seed=0)
    assert counts.shape == (400 // 64, N_CELL_TYPES)
    assert (counts.sum(axis=1) == 64).all()


def test_loader_bench_reads_a_census_shaped_experiment_at_its_full_vocabulary(tmp_path):
    pytest.importorskip("tiledbsoma_ml")
    from scldm_scale.data.census import write_synthetic_census

    root = tmp_path / "census"
    write_synthetic_census(root, n_cells=600, n_genes=300, n_datasets=3, median_library=200)
    timing = Timing(warmup_batches=1, measure_s=0.5, max_batches=4)
    bench = {"timing": timing, "isolate": False, "uri": str(root), "cells_per_read": 256}
    records = run_loader_bench(0, 0, 32, [0], None, None, 0, **bench, group_buffers=2, repeats=2)
    for r in records:
        assert (r["experiment"], r["x_layer"], r["n_cells"], r["n_genes"]) == (str(root), "raw", 600, 300)
    measured = [r for r in records if r["loader"] != "random_permutation"]
    # Two repeats, interleaved: tiledbsoma-ml then ours, twice; each ratio is to its own repeat's baseline.
    assert [(r["repeat"], r["loader"]) for r in measured] == [
        (0, "tiledbsoma_ml"),
        (0, "scldm_scale"),
        (1, "tiledbsoma_ml"),
        (1, "scldm_scale"),
    ]
    for baseline, ours in (measured[0:2], measured[2:4]):
        assert ours["ratio_vs_tiledbsoma_ml"] == pytest.approx(ours["cells_per_s"] / baseline["cells_per_s"])
    for r in measured:
        assert r["n_batches_measured"] >= 1 and 0.0 <= r["shuffle_score"] <= 1.0
        assert r["cells_per_read"] == 256
        assert r["main_cpu_s"] > 0 and r["workers_cpu_s"] == 0  # no workers: all CPU is the measuring process's
        assert r["cpu_s_per_1k_cells"] == pytest.approx(1000 * r["main_cpu_s"] / (32 * r["n_batches_measured"]))
    by_loader = {r["loader"]: r for r in records}
    assert by_loader["scldm_scale"]["buffer_chunks"] == 4 and by_loader["tiledbsoma_ml"]["io_batch_size"] == 256
    assert by_loader["scldm_scale"]["group_buffers"] == 2
    with pytest.raises(ConfigError, match="--cells-per-read must be a positive multiple of 64"):
        run_loader_bench(0, 0, 32, [0], None, None, 0, **{**bench, "cells_per_read": 100})
    with pytest.raises(ConfigError, match="--group-buffers and --repeats must be >= 1"):
        run_loader_bench(0, 0, 32, [0], None, None, 0, **bench, group_buffers=0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seconds", "0"], "--warmup-batches must be >= 0 and --seconds > 0"),
        (["--warmup-batches", "-1"], "--warmup-batches must be >= 0 and --seconds > 0"),
        (["--repeats", "0"], "--group-buffers and --repeats must be >= 1"),
    ],
)
def test_bench_loader_refuses_bad_timing_and_repeats_in_one_line(flags, message, tmp_path, capsys):
    from scldm_scale import cli

    assert cli.main(["bench", "loader", "--cells", "300", "--genes", "20", "--dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # refused before building anything
