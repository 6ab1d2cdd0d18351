"""Single-file checkpoints, written atomically and checked on load.

A checkpoint is a dict with `format`, `version` and `kind` ("vae" or "ldm") besides its payload; it is
written to a temporary file in the same folder, fsynced, then renamed over the target, so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

FORMAT = "scldm-scale"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def save_checkpoint(path: str | Path, kind: str, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, "kind": kind, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch file ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a scldm-scale checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')}, this code reads {VERSION}")
    if kind is not None and data.get("kind") != kind:
        hint = {
            "vae": "pass the checkpoint written by `scldm-scale train ... stage=vae`",
            "ldm": "pass the checkpoint written by `scldm-scale train ... stage=ldm` (it includes the VAE)",
        }[kind]
        raise CheckpointError(f"{path} is a {data.get('kind')!r} checkpoint, expected {kind!r}: {hint}")
    return data


COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "state.pt"


class RunCheckpoints:
    """Training checkpoints of one run: `step-N/` folders under `root`, for resuming.

    A step folder is written as `.step-N.tmp`, fsynced, given its COMPLETE marker and renamed, so a
    folder named step-N is always whole; `latest` (replaced atomically, last) names the newest. If
    `latest` is missing or points at an incomplete folder, the newest complete step folder is used.
    The oldest folders beyond keep_last are deleted after each save.
    """

    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

    def _complete_steps(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        folders = [p for p in self.root.glob("step-*") if p.is_dir() and (p / COMPLETE).exists()]
        return sorted(folders, key=lambda p: int(p.name.split("-")[1]))

    def save(self, step: int, state: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        (tmp / COMPLETE).write_text(f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fd, pointer = tempfile.mkstemp(prefix=".latest.", dir=self.root)
        with os.fdopen(fd, "w") as f:
            f.write(final.name + "\n")
        os.replace(pointer, self.root / LATEST)
        for old in self._complete_steps()[: -self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
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
        folder = Path(folder)
        if not (folder / COMPLETE).exists():
            raise CheckpointError(f"{folder} is not a complete checkpoint (no {COMPLETE} marker); pick another step")
        try:
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        except Exception as err:  # truncated or foreign file
            raise CheckpointError(f"{folder / STATE_FILE} is corrupt ({type(err).__name__}: {err})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
            raise CheckpointError(f"{folder} was not written by this version of scldm-scale")
        return state
