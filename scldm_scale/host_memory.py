"""Host memory: freed large blocks go back to the OS at once (glibc's malloc, the CPU tensors' allocator).

glibc serves a block above its mmap threshold with mmap, which returns it to the OS when it is freed, and a
smaller one from its heap. By default the threshold rises to the size of the largest mmapped block freed so
far (up to 32 MiB), so a loop that allocates and frees blocks of a few MiB each pass, as the chunked decoder
does with each chunk's activations, soon takes them from the heap, where small tensors that live on (a chunk's
logits, autograd's records) sit between them and the freed space is neither reused nor returned. One VAE
training step on the CPU (32 cells, width 64, 32,000 genes in chunks of 1,920) peaked at 1.95 GB of RSS that
way and at 1.03 GB with the threshold fixed at 1 MiB (2,000 genes: 0.97 and 0.89 GB).
"""

from __future__ import annotations

import ctypes
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
