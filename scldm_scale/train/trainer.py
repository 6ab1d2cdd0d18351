"""One training loop for every stage: the model's forward(batch) returns (loss, metrics).

The loop knows nothing about genes or latents. It moves batches to the device, runs the forward under
autocast when bf16 is on, clips the global gradient norm, steps AdamW and the schedule, updates the
EMA, and logs loss, lr, grad norm and cells/s to the progress bar and to a JSONL file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from scldm_scale.config import OptimConfig, TrainConfig
from scldm_scale.train.optim import EMA, build_optimizer, build_scheduler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA devices with bf16 (precision=auto), or wherever precision=bf16 asks."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        optim_cfg: OptimConfig,
        train_cfg: TrainConfig,
        device: torch.device,
        use_ema: bool = False,
        desc: str = "train",
    ):
        self.model = model.to(device)
        self.optim_cfg = optim_cfg
        self.train_cfg = train_cfg
        self.device = device
        self.optimizer = build_optimizer(model, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg)
        self.ema = EMA(model, train_cfg.ema_decay) if use_ema else None
        self.amp_dtype = autocast_dtype(train_cfg.precision, device)
        self.desc = desc
        self.step = 0
        self.history: list[dict] = []

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def fit(self, batches: Iterator) -> list[dict]:
        cfg = self.train_cfg
        max_steps = self.optim_cfg.max_steps
        metrics_file = Path(cfg.metrics_file) if cfg.metrics_file else None
        if metrics_file is not None:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                metrics_file.write_text("")  # a fresh run starts a fresh log
        bar = tqdm(total=max_steps, initial=self.step, desc=self.desc, disable=not cfg.progress, dynamic_ncols=True)
        self.model.train()
        cells, window_start = 0, time.perf_counter()
        while self.step < max_steps:
            batch = next(batches).to(self.device)
            with self._autocast():
                loss, metrics = self.model(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{self.desc}: loss is {loss.item()} at step {self.step}; lower the learning rate "
                    "(optim.<stage>.lr) or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.step += 1
            cells += batch.size
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == max_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": self.step,
                    "loss": loss.item(),
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm.item(),
                    "cells_per_s": cells / max(elapsed, 1e-9),
                    **{k: float(v) for k, v in metrics.items()},
                }
                self.history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", cells_s=f"{record['cells_per_s']:.0f}")
                if metrics_file is not None:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                cells, window_start = 0, time.perf_counter()
        bar.close()
        return self.history
