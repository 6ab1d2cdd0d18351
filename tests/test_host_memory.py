"""host_memory.fix_mmap_threshold: set under glibc, left to the environment when it sets the threshold itself."""

import platform

import pytest

from scldm_scale.host_memory import fix_mmap_threshold


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_threshold_is_fixed_under_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert fix_mmap_threshold()


def test_an_environment_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not fix_mmap_threshold()
