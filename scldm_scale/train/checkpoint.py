"""Training checkpoints: `step-N/` folders for resuming a run, written atomically and checked on load.

They are the run's own files (torch/DCP, with optimizer, RNG and loader state); what other people
load is the model artifact of `scldm_scale.artifact`, which `scldm-scale export` writes from a step folder.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scldm_scale.artifact import CheckpointError

FORMAT = "scldm-scale"


def dcp_failure(err: BaseException) -> str:
    """One line for a torch.distributed.checkpoint error: its CheckpointException (a BaseException, not an
    Exception) carries every failed rank's exception and traceback; the first rank's exception is enough."""
    failures = getattr(err, "failures", None)
    if failures:
        rank, (exc, _) = next(iter(failures.items()))
        return f"{type(exc).__name__} on rank {rank}: {exc}"
    return f"{type(err).__name__}: {err}"


COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "state.pt"
RNG_DIR = "rng"
STEP_VERSION = 2  # step folders: 1 held the weights in state.pt; 2 has them in the strategy's own files


class RunCheckpoints:
    """Training checkpoints of one run: `step-N/` folders under `root`, for resuming.

    A step folder is written as `.step-N.tmp`: every rank writes its shards (the strategy's weights and
    optimizer, its RNG state), then rank 0 writes state.pt (step, schedule, loader, history, ...), fsyncs,
    adds the COMPLETE marker and renames the folder, so a folder named step-N is always whole; `latest`
    (replaced atomically, last) names the newest. If `latest` is missing or points at an incomplete
    folder, the newest complete step folder is used. The oldest folders beyond keep_last are deleted
    after each save. With several nodes, `root` must be on a filesystem they share.
    """

    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

    def _complete_steps(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        folders = [p for p in self.root.glob("step-*") if p.is_dir() and (p / COMPLETE).exists()]
        return sorted(folders, key=lambda p: int(p.name.split("-")[1]))

    def save(self, step: int, state: dict, write_shards: Callable[[Path], None] | None = None) -> Path:
        """Write step-N (every rank calls this; `write_shards(folder)` writes this rank's files)."""
        from scldm_scale import world
        from scldm_scale.train import distributed

        rank = world.get_rank()
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.tmp"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RNG_DIR).mkdir(parents=True)
        distributed.barrier()
        if write_shards is not None:
            write_shards(tmp)
        _save_fsynced({"rng": rng_state()}, tmp / RNG_DIR / f"rank-{rank}.pt")
        distributed.barrier()
        if rank == 0:
            _save_fsynced({"format": FORMAT, "version": STEP_VERSION, **state}, tmp / STATE_FILE)
            (tmp / COMPLETE).write_text(f"{step}\n")
            _remove(final)
            os.replace(tmp, final)
            fd, pointer = tempfile.mkstemp(prefix=".latest.", dir=self.root)
            with os.fdopen(fd, "w") as f:
                f.write(final.name + "\n")
            os.replace(pointer, self.root / LATEST)
            for old in self._complete_steps()[: -self.keep_last] if self.keep_last > 0 else []:
                _remove(old)
        distributed.barrier()
        return final

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if pointer.exists():
            folder = self.root / pointer.read_text().strip()
            if (folder / COMPLETE).exists():
                return folder
        complete = self._complete_steps()
        return complete[-1] if complete else None

    def load(self, folder: str | Path) -> dict:
        return load_step_state(folder)


def load_step_state(folder: str | Path) -> dict:
    """state.pt of a complete step folder, checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not (folder / COMPLETE).exists():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {COMPLETE} marker); pick another step")
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or foreign file
        raise CheckpointError(f"{folder / STATE_FILE} is corrupt ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != STEP_VERSION:
        raise CheckpointError(f"{folder} was not written by this version of scldm-scale")
    return state


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        # This process's own GPU only: another job layout may expose another number of devices.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def load_rng(folder: Path, rank: int) -> dict | None:
    """This rank's RNG state in a step folder (None when the folder was written by fewer ranks)."""
    path = Path(folder) / RNG_DIR / f"rank-{rank}.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)["rng"]


def _remove(folder: Path) -> None:
    """Delete a step folder so that no half-deleted folder ever looks complete: rename it first."""
    if folder.exists():
        trash = folder.with_name(f".trash-{folder.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _save_fsynced(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
