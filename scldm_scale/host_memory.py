"""Host memory: freed large blocks go back to the OS at once (glibc's malloc, the CPU tensors' allocator).

glibc serves a block above its mmap threshold with mmap, which returns it to the OS when it is freed, and a
smaller one from its heap. By default the threshold rises to the size of the largest mmapped block freed so
far (up to 32 MiB), so a loop that allocates and frees blocks of a few MiB each pass, as the chunked decoder
does with each chunk's activations, soon takes them from the heap, where small tensors that live on (a chunk's
logits, autograd's records) sit between them and the freed space is neither reused nor returned. One VAE
training step on the CPU (32 cells, width 64, 32,000 genes in chunks of 1,920) peaked at 1.95 GB of RSS that
way and at 1.03 GB with the threshold fixed at 1 MiB (2,000 genes: 0.97 and 0.89 GB).

The fixed threshold has a price: every block above 1 MiB is then a fresh mmap whose pages fault in on first
touch, each step again. For a model that decodes all its genes in one pass that price buys nothing, and it
made the built-in quickstart twice as slow (idle 2-core CPU, 2026-12-07: 100 VAE + 300 prior steps, VAE 62 s
vs 28 s, prior 62 s vs 33 s). So the threshold is fixed by the work that needs it, the first time it runs:
the decoder when it decodes in chunks on the CPU (`fix_mmap_threshold_once`), and the benchmarks that
measure that work.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

MMAP_THRESHOLD_BYTES = 1 << 20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc malloc.h)


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES for this process (which also stops it rising).

    Nothing happens, and False is returned, without glibc (there is no mallopt to call) or when the environment
    sets MALLOC_MMAP_THRESHOLD_ itself.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


@functools.cache
def fix_mmap_threshold_once() -> bool:
    """`fix_mmap_threshold`, the first time work that frees large blocks chunk by chunk runs in this process."""
    return fix_mmap_threshold()
