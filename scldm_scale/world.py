"""Which process this is among the launched ones (its rank and the world size), the device it computes on,
and how it stops on a signal.

torch.distributed's values once its process group is up, else the launcher's RANK / WORLD_SIZE (torchrun,
the DeepSpeed launcher and launch/slurm.sbatch set them before any group exists), else one process (0, 1).
Always the global rank, never LOCAL_RANK: two nodes would read the same cells. The one lookup of the package
(the loaders shard by it, the CLI, checkpoints and the profiler ask it who talks); it imports only config
from the package, so every floor above config may use it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from scldm_scale.config import ConfigError


def get_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when there is one, else the CPU) or a torch device name, refused with a ConfigError when
    this machine or torch build cannot provide it (rather than torch's AssertionError at the first tensor)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device name; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}, no GPU seen"
        raise ConfigError(
            f"device {name!r} was asked for but CUDA is not available (this torch build {build}); use cpu or auto"
        )
    return device


def rank_and_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the given pair (a loader told its place explicitly), else this process's."""
    if rank is not None and world_size is not None:
        return rank, world_size
    return get_rank(), get_world_size()


class StopRequested(Exception):
    """The process was asked to stop (SIGTERM / SIGINT) and stopped cleanly after saving what it must; the
    command exits with `exit_code` (128 + the signal, as a shell reports a process killed by it)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
