"""One training loop for every stage: the model's forward(batch) returns (loss, metrics).

The loop knows nothing about genes or latents. It moves batches to the device, runs the forward under
autocast when bf16 is on, clips the global gradient norm, steps AdamW and the schedule, updates the
EMA, and logs loss, lr, grad norm and cells/s to the progress bar and to a JSONL file.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from scldm_scale.config import OptimConfig, TrainConfig
from scldm_scale.train.checkpoint import CheckpointError, RunCheckpoints
from scldm_scale.train.optim import EMA, build_optimizer, build_scheduler

log = logging.getLogger(__name__)


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
        checkpoints: RunCheckpoints | None = None,
        run_meta: dict | None = None,
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
        # Saved with every training checkpoint and compared on resume (stage, architecture).
        self.checkpoints = checkpoints
        self.run_meta = dict(run_meta or {})
        self._stop_signal: int | None = None

    def state_dict(self, batches) -> dict:
        return {
            "meta": self.run_meta,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "loader": batches.state_dict(),
            "history": self.history,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def resume(self, state: dict, batches, where: str) -> None:
        """Restore everything a training checkpoint holds; refuse one from another stage or architecture."""
        mismatched = sorted(
            k for k in set(self.run_meta) | set(state["meta"]) if self.run_meta.get(k) != state["meta"].get(k)
        )
        if mismatched:
            details = "; ".join(
                f"{k}: checkpoint {state['meta'].get(k)!r} vs now {self.run_meta.get(k)!r}" for k in mismatched
            )
            raise CheckpointError(
                f"{where} does not match this run ({details}); use the same stage and model config, "
                "or start afresh with train.resume=never and another train.ckpt_dir"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            # Checkpoints load on the CPU; the shadow must live where the model does.
            self.ema.shadow = {k: v.to(self.device) for k, v in self.ema.shadow.items()}
        batches.load_state_dict(state["loader"])
        self.step = state["step"]
        self.history = list(state["history"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def maybe_resume(self, batches) -> None:
        """train.resume: never | auto (latest complete checkpoint of this run, if any) | a step folder."""
        mode = self.train_cfg.resume
        if mode == "never" or self.checkpoints is None:
            return
        folder = self.checkpoints.latest() if mode == "auto" else Path(mode)
        if folder is None:
            log.info("%s: no checkpoint under %s, starting from step 0", self.desc, self.checkpoints.root)
            return
        self.resume(self.checkpoints.load(folder), batches, str(folder))
        log.info("%s: resumed from %s at step %d", self.desc, folder, self.step)

    def _save(self, batches) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save(self.step, self.state_dict(batches))

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum  # finish the current step, checkpoint, then stop

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
            # A fresh run starts an empty log; a resumed one keeps exactly the records up to its step,
            # dropping any logged after the checkpoint by a run that then crashed.
            metrics_file.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:
            for sig in previous:
                signal.signal(sig, self._on_signal)
        try:
            return self._loop(batches, max_steps, metrics_file)
        finally:
            if in_main_thread:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _loop(self, batches: Iterator, max_steps: int, metrics_file: Path | None) -> list[dict]:
        cfg = self.train_cfg
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
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < max_steps:
                self._save(batches)
            if self._stop_signal is not None:
                bar.close()
                self._save(batches)
                raise TrainingInterrupted(self._stop_signal, self.step, self.checkpoints)
        bar.close()
        if cfg.ckpt_every:
            self._save(batches)
        return self.history


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived: the step finished, a checkpoint was written, the run stops cleanly."""

    def __init__(self, signum: int, step: int, checkpoints: RunCheckpoints | None):
        self.exit_code = 128 + signum
        where = f"a checkpoint is in {checkpoints.root}" if checkpoints else "no checkpoint dir was set"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; {where}. "
            "Resume with the same command plus train.resume=auto"
        )
