"""One training loop for every stage and strategy: the model's forward(batch) returns (loss, metrics).

The loop knows nothing about genes or latents, nor about how the model is spread over processes (that is
the Strategy's: single, ddp, fsdp, deepspeed; the loop asks it, never which one it is). Per step it runs
grad_accum_steps micro-batches under autocast, lets the strategy clip the global gradient norm and step
AdamW, the schedule and the EMA, logs loss (mean over ranks), lr, grad norm, cells/s, tokens/s, the
fraction of the time spent waiting for data, MFU and peak memory on rank 0 (progress bar, JSONL, W&B),
calls `fit`'s `on_step(step, record)` after every optimizer step, checkpoints every train.ckpt_every steps,
and on SIGTERM/SIGINT (agreed by all ranks) finishes the step, checkpoints and stops.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from scldm_scale.artifact import CheckpointError
from scldm_scale.config import OptimConfig, TrainConfig
from scldm_scale.train import distributed
from scldm_scale.train.checkpoint import RunCheckpoints, load_rng, load_step_state, set_rng_state
from scldm_scale.train.distributed import Dist
from scldm_scale.train.flops import mfu, peak_tflops
from scldm_scale.train.strategies import build_strategy
from scldm_scale.world import StopRequested

log = logging.getLogger(__name__)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA devices with bf16 (precision=auto), or wherever precision=bf16 asks."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class Trainer:
    """The training loop over a Strategy (single process, DDP, FSDP2 or DeepSpeed).

    `work(batch)` -> (tokens, FLOPs) of a training step on that batch, for tokens/s and MFU (optional).
    `tracker` receives every logged record on rank 0 (W&B; optional).
    """

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
        dist_info: Dist | None = None,
        work: Callable | None = None,
        tracker=None,
        export: tuple[dict, dict] | None = None,
    ):
        self.dist = dist_info or Dist(0, 1, 0, device)
        self.device = self.dist.device
        self.optim_cfg = optim_cfg
        self.train_cfg = train_cfg
        self.amp_dtype = autocast_dtype(train_cfg.precision, self.device)
        self.strategy = build_strategy(
            model, optim_cfg, train_cfg, dist_info=self.dist, amp_dtype=self.amp_dtype, use_ema=use_ema
        )
        self.model = self.strategy.model
        self.desc = desc
        self.step = 0
        self.history: list[dict] = []
        # Saved with every training checkpoint and compared on resume (stage, architecture).
        self.checkpoints = checkpoints
        self.run_meta = dict(run_meta or {})
        self.work = work
        self.tracker = tracker
        # (config, tensors) of the stage's model artifact without its trained weights (artifact.to_parts):
        # what `scldm-scale export` needs besides the weights to write the artifact from a step folder.
        self.export = export
        self.peak_tflops = peak_tflops(self.device, train_cfg.peak_tflops)
        if self.dist.world_size > 1:
            # Every rank built the same initial weights from the shared seed; from here on each rank draws
            # its own noise (flow-matching t, condition dropout, posterior samples) for its own cells.
            seed = (torch.initial_seed() + 1_000_003 * self.dist.rank) % 2**32
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
        self._stop_signal: int | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.strategy.optimizer

    @property
    def scheduler(self):
        return self.strategy.scheduler

    @property
    def ema(self):
        return self.strategy.ema

    def state_dict(self, batches) -> dict:
        """What a step folder holds besides the strategy's weights/optimizer files and the RNG states."""
        return {
            "meta": self.run_meta,
            "step": self.step,
            "strategy": self.strategy.name,
            "world_size": self.dist.world_size,
            "scheduler": self.scheduler.state_dict(),
            "ema_updates": self.ema.n_updates if self.ema is not None else None,
            "loader": batches.state_dict(),
            "history": self.history,
            "export": self.export,
        }

    def resume(self, folder: Path, batches) -> None:
        """Restore everything a step folder holds; refuse one from another stage or architecture."""
        state = load_step_state(folder)
        mismatched = sorted(
            k for k in set(self.run_meta) | set(state["meta"]) if self.run_meta.get(k) != state["meta"].get(k)
        )
        if mismatched:
            details = "; ".join(
                f"{k}: checkpoint {state['meta'].get(k)!r} vs now {self.run_meta.get(k)!r}" for k in mismatched
            )
            raise CheckpointError(
                f"{folder} does not match this run ({details}); use the same stage and model config, "
                "or start afresh with train.resume=never and another train.ckpt_dir"
            )
        self.strategy.check_resumable(folder, state["strategy"], state["world_size"])
        self.strategy.load(folder)
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # whatever the optimizer state restored, the schedule's lr is the one
        if self.ema is not None:
            self.ema.n_updates = state["ema_updates"]
        batches.load_state_dict(state["loader"])
        self.step = state["step"]
        self.history = list(state["history"])
        rng = load_rng(folder, self.dist.rank) if state["world_size"] == self.dist.world_size else None
        if rng is not None:
            set_rng_state(rng)
        else:  # another number of ranks: the random streams cannot continue; start them from (seed, step, rank)
            log.warning(
                "%s: %d ranks now, %d in %s: RNG streams restart",
                self.desc,
                self.dist.world_size,
                state["world_size"],
                folder,
            )
            torch.manual_seed(self.step * 1_000_003 + self.dist.rank)
            np.random.seed((self.step, self.dist.rank))
            random.seed(self.step * 1_000_003 + self.dist.rank)

    def maybe_resume(self, batches) -> None:
        """train.resume: never | auto (latest complete checkpoint of this run, if any) | a step folder."""
        mode = self.train_cfg.resume
        if mode == "never" or self.checkpoints is None:
            return
        folder = self.checkpoints.latest() if mode == "auto" else Path(mode)
        folder = distributed.broadcast_object(folder)  # every rank resumes from the folder rank 0 sees
        if folder is None:
            log.info("%s: no checkpoint under %s, starting from step 0", self.desc, self.checkpoints.root)
            return
        self.resume(folder, batches)
        log.info("%s: resumed from %s at step %d", self.desc, folder, self.step)

    def _save(self, batches) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save(self.step, self.state_dict(batches), self.strategy.save)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum  # finish the current step, checkpoint, then stop

    def fit(self, batches: Iterator, on_step: Callable[[int, dict | None], None] | None = None) -> list[dict]:
        """Train up to optim.max_steps; returns the logged records.

        on_step(step, record) runs on every rank after each optimizer step, with the record logged at that
        step (None between logging steps), e.g. to advance a profiler's schedule.
        """
        cfg = self.train_cfg
        max_steps = self.optim_cfg.max_steps
        metrics_file = Path(cfg.metrics_file) if cfg.metrics_file and self.dist.is_main else None
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
            return self._loop(batches, max_steps, metrics_file, on_step)
        finally:
            if in_main_thread:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _stop_requested(self) -> int | None:
        """The signal any rank received (all ranks agree, so they checkpoint at the same step)."""
        if self.dist.world_size == 1:
            return self._stop_signal
        flag = torch.tensor([self._stop_signal or 0], dtype=torch.int64, device=self._collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def _collective_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    def _loop(
        self, batches: Iterator, max_steps: int, metrics_file: Path | None, on_step: Callable | None
    ) -> list[dict]:
        cfg = self.train_cfg
        strategy = self.strategy
        show = cfg.progress and self.dist.is_main
        bar = tqdm(total=max_steps, initial=self.step, desc=self.desc, disable=not show, dynamic_ncols=True)
        self.model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        cells = tokens = flops = 0
        data_wait = 0.0  # seconds of the logging window spent in next(batches)
        window_start = time.perf_counter()
        while self.step < max_steps:
            strategy.zero_grad()
            step_loss, step_metrics = 0.0, {}  # means over the micro-batches of the step
            for micro in range(cfg.grad_accum_steps):
                wait_start = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - wait_start
                if self.work is not None:  # on the host batch: no device sync
                    batch_tokens, batch_flops = self.work(batch)
                    tokens, flops = tokens + batch_tokens, flops + batch_flops
                batch = batch.to(self.device)
                with strategy.no_sync(micro == cfg.grad_accum_steps - 1), strategy.autocast():
                    loss, metrics = strategy.module(batch)
                if not torch.isfinite(loss):
                    where = f" on rank {self.dist.rank}" if self.dist.world_size > 1 else ""
                    raise FloatingPointError(
                        f"{self.desc}: loss is {loss.item()} at step {self.step}{where}; lower the learning rate "
                        "(optim.<stage>.lr) or check the data"
                    )
                strategy.backward(loss)
                cells += batch.size
                step_loss = step_loss + loss.detach() / cfg.grad_accum_steps
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + torch.as_tensor(v).detach() / cfg.grad_accum_steps
            grad_norm = strategy.step()
            self.step += 1
            bar.update(1)
            record = None
            if self.step % cfg.log_every == 0 or self.step == max_steps:
                record = self._record(step_loss, step_metrics, grad_norm, cells, tokens, flops, data_wait, window_start)
                self.history.append(record)
                if self.dist.is_main:
                    bar.set_postfix(
                        loss=f"{record['loss']:.4g}",
                        cells_s=f"{record['cells_per_s']:.0f}",
                        data_wait=f"{record['data_wait_frac']:.0%}",
                    )
                    if metrics_file is not None:
                        with metrics_file.open("a") as f:
                            f.write(json.dumps(record) + "\n")
                    if self.tracker is not None:
                        self.tracker.log(record)
                cells = tokens = flops = 0
                data_wait = 0.0
                window_start = time.perf_counter()
            if on_step is not None:
                on_step(self.step, record)
            stop = self._stop_requested()
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < max_steps and stop is None:
                self._save(batches)
            if stop is not None:
                bar.close()
                self._save(batches)
                raise TrainingInterrupted(stop, self.step, self.checkpoints)
        bar.close()
        if cfg.ckpt_every:
            self._save(batches)
        return self.history

    def _record(self, loss, metrics, grad_norm, cells, tokens, flops, data_wait, window_start) -> dict:
        """One log record; loss, metrics and the data-wait fraction are means over ranks, throughput is the job's."""
        world = self.dist.world_size
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        extra = [torch.as_tensor(v, device=loss.device).float() for v in metrics.values()]
        wait_frac = torch.tensor(min(data_wait / elapsed, 1.0), device=loss.device)
        values = torch.stack([loss.detach().float(), wait_frac, *extra])
        values = distributed.mean_over_ranks(values.to(self._collective_device() if world > 1 else values.device))
        record = {
            "step": self.step,
            "loss": values[0].item(),
            "lr": self.strategy.lr(),
            "grad_norm": float(grad_norm),
            "cells_per_s": cells * world / elapsed,
            "tokens_per_s": tokens * world / elapsed if self.work is not None else None,
            # Of the window's wall time, the part spent in next(batches): near 1, the loader is the bottleneck.
            "data_wait_frac": values[1].item(),
            # Model FLOPs per second of one rank over its device's peak (None where the peak is unknown).
            "mfu": mfu(flops / elapsed, self.peak_tflops) if self.work is not None and self.peak_tflops else None,
            "max_mem_gb": max_memory_gb(self.device),
            **{k: v.item() for k, v in zip(metrics, values[2:], strict=True)},
        }
        return record


def max_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA memory allocated on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class TrainingInterrupted(StopRequested):
    """SIGTERM/SIGINT arrived: the step finished, a checkpoint was written, the run stops cleanly."""

    def __init__(self, signum: int, step: int, checkpoints: RunCheckpoints | None):
        where = f"a checkpoint is in {checkpoints.root}" if checkpoints else "no checkpoint dir was set"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; {where}. "
            "Resume with the same command plus train.resume=auto",
            signum,
        )
