"""Single-file checkpoints, written atomically and checked on load.

A checkpoint is a dict with `format`, `version` and `kind` ("vae" or "ldm") besides its payload; it is
written to a temporary file in the same folder, fsynced, then renamed over the target, so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
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
