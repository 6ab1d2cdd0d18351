"""threads.py: the thread count from the free cores (mocked loads), the overrides' precedence, the line it logs."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from scldm_scale import threads
from scldm_scale.cli import main
from scldm_scale.config import ConfigError
from scldm_scale.threads import ENV, choose_threads


def _load(busy: float | None):
    calls = []

    def busy_by_others() -> float | None:
        calls.append(busy)
        return busy

    return busy_by_others, calls


@pytest.mark.parametrize(
    ("usable", "busy", "expected"),
    [
        (2, 0.0, 2),  # idle: every core
        (2, 0.4, 2),  # light background load: a core is taken only when more than half of it is busy
        (2, 0.6, 1),
        (2, 1.0, 1),  # the case: one single-threaded job beside the command
        (2, 3.5, 1),  # nothing free: still one thread
        (16, 4.2, 12),
        (8, None, 8),  # load unreadable (not Linux): the usable cores
    ],
)
def test_free_cores_decide_without_overrides(usable, busy, expected):
    busy_by_others, calls = _load(busy)
    choice = choose_threads({}, usable, 1, busy_by_others)
    assert choice.threads == expected
    assert calls == [busy]
    assert f"{ENV}=N sets it" in choice.reason


@pytest.mark.parametrize(
    ("usable", "busy", "local_ranks", "expected"),
    [
        (8, 0.0, 4, 2),
        (8, 3.0, 2, 2),  # 5 free cores, 2 ranks: 2 each, so the ranks' threads fit in the free cores
        (8, 0.0, 3, 2),
        (4, 0.0, 8, 1),  # more ranks than cores: one thread each
    ],
)
def test_local_ranks_share_the_free_cores(usable, busy, local_ranks, expected):
    choice = choose_threads({}, usable, local_ranks, _load(busy)[0])
    assert choice.threads == expected
    assert choice.threads * local_ranks <= max(local_ranks, usable - int(busy))
    assert f"shared by {local_ranks} local ranks" in choice.reason


def test_scldm_threads_wins_over_omp_num_threads_and_skips_the_look():
    busy_by_others, calls = _load(0.0)
    choice = choose_threads({ENV: "3", "OMP_NUM_THREADS": "1"}, 2, 1, busy_by_others)
    assert (choice.threads, choice.reason, calls) == (3, f"{ENV}=3", [])


def test_omp_num_threads_is_left_as_set():
    busy_by_others, calls = _load(1.0)
    assert choose_threads({"OMP_NUM_THREADS": "4"}, 2, 1, busy_by_others).threads == 4
    assert choose_threads({"OMP_NUM_THREADS": "3,1"}, 2, 1, busy_by_others).threads == 3  # one count per level
    assert calls == []


def test_scldm_threads_auto_ignores_omp_num_threads():
    busy_by_others, calls = _load(1.0)
    choice = choose_threads({ENV: "auto", "OMP_NUM_THREADS": "2"}, 2, 1, busy_by_others)
    assert choice.threads == 1 and calls == [1.0]


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_a_bad_scldm_threads_is_refused_naming_the_variable(bad):
    with pytest.raises(ConfigError, match=rf"{ENV}='{bad}' is neither .*set e\.g\. {ENV}=2, or unset it"):
        choose_threads({ENV: bad}, 2, 1, _load(0.0)[0])


def test_busy_cores_leave_out_this_process(monkeypatch):
    # Two CPUs, 30 ticks each over the look; 60 busy ticks of which 10 were this process's own: 50 / 30 cores.
    cpu = iter([(100, 1000), (160, 1060)])
    own = iter([5, 15])
    monkeypatch.setattr(threads, "_cpu_ticks", lambda cpus: next(cpu))
    monkeypatch.setattr(threads, "_process_ticks", lambda pids: next(own))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert threads.busy_cores_by_others() == pytest.approx(50 / 30)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_proc_stat_is_read():
    busy, total = threads._cpu_ticks(os.sched_getaffinity(0))
    assert 0 <= busy <= total and total > 0
    assert threads._process_ticks({os.getpid()}) >= 0
    assert os.getpid() in threads._sibling_pids()
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_a_compute_command_sets_and_logs_its_threads(monkeypatch, caplog, restore_threads):
    limits = []
    monkeypatch.setattr(threads, "threadpool_limits", lambda **kwargs: limits.append(kwargs["limits"]))
    for name in threads.LIBRARY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ENV, "2")
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO, logger="scldm_scale.threads"):
        choice = threads.use_free_cores("train")
    assert choice.threads == 2 and torch.get_num_threads() == 2 and limits == [2]
    assert all(os.environ[name] == "2" for name in threads.LIBRARY_ENV)
    assert caplog.messages == [f"2 threads per process ({ENV}=2)"]


def test_other_commands_and_in_process_calls_keep_the_threads(monkeypatch, caplog, restore_threads):
    monkeypatch.setenv(ENV, "2")
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO, logger="scldm_scale.threads"):
        assert threads.use_free_cores("plan") is None
        assert main(["train", "does-not-exist.yaml"]) == 2  # main([...]): the caller's settings stand
    assert torch.get_num_threads() == 1 and caplog.messages == []


def test_the_cli_prints_the_chosen_threads(tmp_path):
    env = {**os.environ, ENV: "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "scldm_scale", "train", "missing.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"scldm_scale.threads: 1 thread per process ({ENV}=1)" in proc.stderr
