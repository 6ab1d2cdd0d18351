"""host_memory: the decoder's malloc policy, set once per process, left to the environment when it sets malloc's own."""

import platform

import pytest

from scldm_scale import host_memory

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)


@pytest.fixture
def fresh_policy(monkeypatch):
    """A process that has not set a policy yet, whose mallopt calls are recorded (and not made)."""
    calls = []
    monkeypatch.setattr(host_memory, "_policy", None)
    monkeypatch.setattr(host_memory, "_chosen", False)
    monkeypatch.setattr(host_memory, "_mallopt", lambda *settings: calls.append(dict(settings)) or True)
    return calls


def test_a_one_pass_decoder_keeps_freed_blocks_once(fresh_policy):
    assert host_memory.decoder_memory_policy(chunked=False) == "keep"
    assert host_memory.decoder_memory_policy(chunked=False) == "keep"
    assert host_memory.KEEP_TRIM_THRESHOLD_BYTES < 2**31  # mallopt's value is a C int
    assert fresh_policy == [
        {host_memory.M_MMAP_MAX: 0, host_memory.M_TRIM_THRESHOLD: host_memory.KEEP_TRIM_THRESHOLD_BYTES}
    ]


def test_a_chunked_decoder_replaces_keep_and_is_never_replaced(fresh_policy):
    host_memory.decoder_memory_policy(chunked=False)
    assert host_memory.decoder_memory_policy(chunked=True) == "release"
    assert host_memory.decoder_memory_policy(chunked=False) == "release"
    release = fresh_policy[1]
    assert release[host_memory.M_MMAP_THRESHOLD] == host_memory.MMAP_THRESHOLD_BYTES
    assert release[host_memory.M_MMAP_MAX] == host_memory.GLIBC_MMAP_MAX_DEFAULT  # mmap allowed again
    assert len(fresh_policy) == 2


@glibc_only
def test_glibc_accepts_both_policies(monkeypatch):
    for name in host_memory.ENVIRONMENT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    try:
        assert host_memory.keep_freed_blocks()
        assert host_memory.fix_mmap_threshold()
    finally:  # leave this test process with the policy its decoders would have chosen
        host_memory._policy = None


@pytest.mark.parametrize("name", host_memory.ENVIRONMENT_SETTINGS)
def test_an_environment_setting_wins(monkeypatch, name):
    monkeypatch.setenv(name, "65536")
    assert not host_memory.fix_mmap_threshold()
    assert not host_memory.keep_freed_blocks()


@glibc_only
def test_reading_soma_keeps_the_training_steps_pages(soma_experiment):
    """Under "keep", a SOMA read between steps must not hand the steps' freed pages back to the OS: TileDB's
    malloc_trim and its 1 GiB read buffers did (soma.TILEDB_CONFIG), and every step faulted them in again."""
    import subprocess
    import sys

    code = f"""
import resource, numpy as np, torch
from scldm_scale import host_memory
from scldm_scale.data.soma import SomaCells, SomaSpec
assert host_memory.decoder_memory_policy(chunked=False) == "keep"
cells = SomaCells(SomaSpec(uri={soma_experiment.uri!r}))
a = torch.randn(64, 512, 64)  # 8 MiB; a step's 30 of them are 256 MiB of freed blocks
def step():
    saved = [a * 1.5 + 1 for _ in range(30)]  # held together, like the activations a backward pass needs
    return float(sum(t[0, 0, 0] for t in saved))
step(); cells.read(np.arange(50)); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cells.read(np.arange(50))
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    faults_per_step = float(out.stdout.strip().splitlines()[-1])
    assert faults_per_step < 2_000, faults_per_step  # 256 MiB of fresh pages would be ~65,000 faults


def test_train_host_memory_sets_the_policy_for_the_process(fresh_policy):
    assert host_memory.choose_policy("auto") is None and fresh_policy == []  # auto: the decoder decides
    assert host_memory.choose_policy("keep") == "keep"
    # a chunked decoder would take "release"; the chosen policy stays
    assert host_memory.decoder_memory_policy(chunked=True) == "keep"
    assert len(fresh_policy) == 1 and -4 in fresh_policy[0]  # M_MMAP_MAX set once, by the choice
