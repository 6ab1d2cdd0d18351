"""How a command's process stops: Ctrl-C held back where it must not land, and the exit at once.

`DeferredInterrupt`: Ctrl-C held back while code that must not be cut mid-way runs, acted on once it returns.

A KeyboardInterrupt raised inside native code can leave a process worse off than stopped: raised while
torch, numpy or scipy import, it was seen to crash the process (pybind11 aborts), to hang it, to leave a
half-imported numpy that ends in a RecursionError reported as a bug; raised inside a tiledbsoma write, to
segfault. Inside `DeferredInterrupt` SIGINT is only recorded; `check()` (between safe steps) or the block's
end raises the KeyboardInterrupt.

`end_process(code)`: exit with `code` after flushing, without the interpreter's finalization. The CLI ends so
after Ctrl-C: an interrupt that passed through a string run by `exec` (dataclasses build their methods so, at
import and later) is kept by CPython as "unhandled" even when caught, and at the end of finalization it kills a
`python -m` process with SIGINT, turning the CLI's 130 into a death by signal, now and then. And after a process
group ran (train/distributed.py says why).

Standard library only: the CLI uses it before any heavy module loads.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from typing import NoReturn


class DeferredInterrupt:
    """`with DeferredInterrupt() as interrupt: ...; interrupt.check(); ...` — SIGINT inside the block is
    recorded and raised at `check()` or at the block's end. Outside the main thread signals cannot be
    handled, and a process started to ignore SIGINT (nohup, a background job of a script) keeps ignoring it:
    then the block changes nothing."""

    def __enter__(self) -> DeferredInterrupt:
        self.received = False
        in_main = threading.current_thread() is threading.main_thread()
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        self.previous = signal.signal(signal.SIGINT, self._record) if in_main and not ignored else None
        return self

    def _record(self, signum, frame) -> None:
        self.received = True

    def check(self) -> None:
        if self.received:
            raise KeyboardInterrupt

    def __exit__(self, kind, error, trace) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if kind is None:
            self.check()


def end_process(code: int) -> NoReturn:
    """Exit with `code` at once, after collecting reference cycles (their finalizers run) and flushing the
    logs and the standard streams; atexit handlers and the interpreter's finalization do not run."""
    gc.collect()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say on it
            pass
    os._exit(code)
