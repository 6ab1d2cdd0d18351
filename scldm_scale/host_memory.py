"""Host memory: how glibc's malloc (the CPU tensors' allocator) treats the large blocks a training step frees.

glibc serves a block above its mmap threshold with mmap and returns it to the OS when it is freed; a smaller one
comes from its heap. By default the threshold rises to the size of the largest mmapped block freed so far, up to
32 MiB, and the heap's free top is returned to the OS past a trim threshold. Which is right depends on the work,
so the decoder picks a policy the first time it runs on the CPU:

- "release", when it decodes in chunks: the threshold fixed at 1 MiB. A loop that allocates and frees blocks of
  a few MiB each chunk otherwise soon takes them from the heap, where small tensors that live on (a chunk's
  logits, autograd's records) sit between them and the freed space is neither reused nor returned. One VAE
  training step on the CPU (32 cells, width 64, 32,000 genes in chunks of 1,920) peaked at 1.95 GB of RSS that
  way and at 1.03 GB with the threshold fixed (2,000 genes: 0.97 and 0.89 GB). The price is a fresh mmap, and
  its pages faulted in on first touch, for every block above 1 MiB of every step: that made the built-in
  quickstart twice as slow (idle 2-core CPU, 2026-12-07: 100 VAE + 300 prior steps, VAE 62 s vs 28 s, prior
  62 s vs 33 s), so nothing else takes this policy.
- "keep", when it decodes every gene in one pass: no block is mmapped and the heap is not trimmed (below
  2 GiB free), so each step reuses the pages of the step before. Even glibc's default mmaps the blocks above
  32 MiB (the built-in quickstart's decoder MLP makes several per step) and gives back the heap's top between
  steps: 52,000 page faults per VAE step there, 22,000 with this policy (40 steps, one thread, 2026-12-07:
  2.3-2.6 M faults and 4.8-6.0 s of system time vs 1.0 M and 2.5-3.0 s), the same peak RSS (1.0 GB).

`train.host_memory=keep|release` sets either for the whole process instead (`choose_policy`): the quickstart's
`--data` sizing keeps, as its chunked decoder of 9,216 genes a step spent more time in page faults than in
arithmetic under "release" (30 VAE steps, 2 threads, idle, 2026-12-07: 44 s wall and 31 s of system time vs 23 s
and 1 s, peak RSS 1.09 vs 1.48 GB).
A chunked decoder's "release" replaces an earlier "keep" in the same process (its memory bound matters more);
"keep" never replaces "release". Nothing is changed without glibc (there is no mallopt to call) or when the
environment sets malloc's parameters itself (MALLOC_*_ variables or GLIBC_TUNABLES).
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD_BYTES = 1 << 20
KEEP_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes a C int: trim only past 2 GiB of free heap top
GLIBC_MMAP_MAX_DEFAULT = 65536
GLIBC_TRIM_THRESHOLD_DEFAULT = 128 * 1024
# mallopt's parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
ENVIRONMENT_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)

_policy: str | None = None  # the policy this process set, if any
_chosen = False  # set by train.host_memory (choose_policy): the decoder leaves it as it is


def _mallopt(*settings: tuple[int, int]) -> bool:
    """mallopt each (parameter, value); False without glibc or when the environment sets malloc's parameters."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in ENVIRONMENT_SETTINGS):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([bool(mallopt(param, value)) for param, value in settings])


def fix_mmap_threshold() -> bool:
    """The "release" policy now: every block above MMAP_THRESHOLD_BYTES mmapped and returned when freed.

    Returns False, changing nothing, without glibc or when the environment sets malloc's parameters.
    """
    return _mallopt(
        (M_MMAP_MAX, GLIBC_MMAP_MAX_DEFAULT),
        (M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD_DEFAULT),
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
    )


def keep_freed_blocks() -> bool:
    """The "keep" policy now: no block mmapped, the heap never trimmed, so freed pages are reused as they are.

    Returns False, changing nothing, without glibc or when the environment sets malloc's parameters.
    """
    return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD_BYTES))


def choose_policy(policy: str) -> str | None:
    """train.host_memory: "auto" leaves the choice to the decoder; "keep" / "release" set it for the whole
    process, and the decoder then changes nothing. Returns the process's policy (None if none was set)."""
    global _policy, _chosen
    if policy == "auto":
        return _policy
    if (keep_freed_blocks if policy == "keep" else fix_mmap_threshold)():
        _policy, _chosen = policy, True
    return _policy


def decoder_memory_policy(chunked: bool) -> str | None:
    """Set the policy of the decoder that is about to run on the CPU, once: "release" for a chunked decoder,
    "keep" for a one-pass one unless "release" was set, nothing when train.host_memory chose one. Returns the
    process's policy (None if none was set)."""
    global _policy
    wanted = "release" if chunked else "keep"
    if _chosen or _policy == wanted or _policy == "release":
        return _policy
    if (fix_mmap_threshold if chunked else keep_freed_blocks)():
        _policy = wanted
    return _policy
