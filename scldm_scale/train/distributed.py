"""The process group: started from torchrun's environment, ended cleanly on success and on error.

torchrun (and the DeepSpeed launcher, and launch/slurm.sbatch through torchrun) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT. The backend follows the device: NCCL on CUDA, gloo on CPU. Each
process uses the GPU of its LOCAL_RANK; data sharding uses the global RANK.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from scldm_scale import stopping
from scldm_scale.config import ConfigError, TrainConfig
from scldm_scale.world import get_world_size

log = logging.getLogger(__name__)

_started_here = False  # setup() started a process group in this process (see end_process)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig, device: torch.device) -> Dist:
    """Start the process group the strategy needs (a 1-process group when run without torchrun)."""
    global _started_here
    world_size = get_world_size()
    if cfg.strategy == "single":
        if world_size > 1:
            raise ConfigError(
                f"train.strategy=single but {world_size} processes were launched: every process would train its "
                "own copy on the same data; use train.strategy=ddp, fsdp or deepspeed under torchrun"
            )
        return Dist(0, 1, 0, device)
    if not dist.is_initialized():
        # Without a launcher, a group of one: the same code path as N ranks, e.g. to test a strategy.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        local_rank = int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
        _started_here = True
        log.info("rank %d/%d: %s process group on %s", dist.get_rank(), dist.get_world_size(), backend, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def teardown(ok: bool) -> None:
    """End the process group: a barrier first on success (no rank exits while another still saves)."""
    if not dist.is_initialized():
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def started_a_group() -> bool:
    """Whether setup() started a process group in this process (ended or not)."""
    return _started_here


def end_process(code: int) -> NoReturn:
    """Exit with `code` without Python's interpreter finalization (stopping.end_process).

    A gloo or NCCL group keeps C++ worker threads for as long as anything (a device mesh, a DeepSpeed
    engine, a barrier's record of earlier work) holds it, and destroy_process_group does not join them.
    A worker that drops the last reference to a tensor while the interpreter finalizes takes the GIL, is
    unwound by pthread_exit and aborts the whole process: SIGABRT, "terminate called without an active
    exception", a non-zero exit after the run finished and saved (pytorch/pytorch#38228, #190489; rare,
    commoner on a loaded machine). multiprocessing's children end the same way, with os._exit. The
    collection first lets groups and engines held only by reference cycles go, their threads joined.
    """
    stopping.end_process(code)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (for logging: every rank's loss, not rank 0's alone)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
