"""Plain helpers shared by test modules (import them as `from scldm_test_helpers import ...`; `from conftest
import` is ambiguous once tests/kernels/conftest.py is collected too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


# configs/quickstart.yaml's VAE hides random encoder tokens in training (model.encoder_token_dropout). Each rank draws
# its own, so a run split over ranks gives the one-process loss curve only with the draw off.
NO_TOKEN_DROPOUT = "model.encoder_token_dropout=0"


def synthetic_vae_args(h5ad: Path, ckpt_dir: Path, metrics: Path | None = None) -> list[str]:
    """Overrides that train the VAE stage on the synthetic .h5ad (add tiny_overrides and the rest)."""
    args = ["stage=vae", "data.source=h5ad", f"data.path={h5ad}", "data.condition_keys=[cell_type]"]
    args.append(f"train.ckpt_dir={ckpt_dir}")
    return args + ([f"train.metrics_file={metrics}"] if metrics is not None else [])


def saved_tensor_bytes(model: torch.nn.Module, loss_fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass, parameters excluded."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    del loss
    return sum(saved.values())


def dead_pid() -> int:
    """The id of a process that has exited and been reaped (the owner of a partial left by a kill -9)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
