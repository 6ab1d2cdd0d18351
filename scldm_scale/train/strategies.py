"""How a model is spread over processes: `train.strategy` = single | ddp | fsdp | deepspeed.

Every strategy gives the trainer the same things, so the trainer never asks which strategy it has:
- the module to call, and per optimizer step `zero_grad()`, then per micro-batch `no_sync(last)` and
  `backward(loss)`, then `step()` (clip the global gradient norm, step the optimizer, the schedule and the
  EMA; returns the norm);
- `check_resumable(folder, saved_strategy, saved_world_size)` (which checkpoints it can read: its own
  format, on the ranks that format allows), `save(folder)` / `load(folder)` for training checkpoints;
- `full_state_dict()`, the whole model's weights for the exported model artifact.

- single: one process, plain module.
- ddp: DistributedDataParallel; gradients are averaged over ranks in the backward pass.
- fsdp: FSDP2 `fully_shard` on every transformer block, then on the root (parameters, gradients and
  optimizer states sharded; a block's parameters are gathered for its forward and backward), with a
  `MixedPrecisionPolicy` (bf16 parameters under train.precision=bf16, train.reduce_dtype reductions).
- deepspeed: a DeepSpeed engine with ZeRO stage train.zero_stage (1: optimizer states sharded, 2: and
  gradients, 3: and parameters), optimizer states optionally offloaded to the CPU. The DeepSpeed config
  is built from ours; the optimizer is our torch AdamW (no DeepSpeed op is compiled). The engine is told
  the gradient-accumulation boundary per micro-batch and steps once per optimizer step, like the others.

Checkpoints (inside a step folder written by RunCheckpoints):
- single, ddp, fsdp: `weights/`, a torch.distributed.checkpoint (DCP) of {model, optimizer, ema} keyed by
  parameter name, each rank writing its shards. DCP reshards on load, so a checkpoint written by N ranks
  loads on M ranks, under another of these three strategies, or in one process.
- deepspeed: `deepspeed/`, DeepSpeed's own checkpoint (model and ZeRO-partitioned optimizer); it resumes on
  the same number of ranks. The EMA is partitioned like the weights: under ZeRO-3 every rank keeps and
  updates only its own flat partition of each parameter (`param.ds_tensor`), so no rank gathers the model
  for it. Rank 0 writes `ema.pt` (decay, update count, the replicated tensors: every tensor under ZeRO-1/2,
  the buffers under ZeRO-3, and the full shape of each partitioned one), and under ZeRO-3 each rank r its
  partitions in `ema-rank{r}.pt`; `ema_from_files` joins them (export). Only `full_ema_state_dict` (the
  exported artifact) gathers the EMA, onto rank 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from scldm_scale.artifact import CheckpointError
from scldm_scale.config import ConfigError, OptimConfig, TrainConfig
from scldm_scale.train.checkpoint import dcp_failure
from scldm_scale.train.distributed import Dist
from scldm_scale.train.optim import EMA, build_optimizer, build_scheduler

log = logging.getLogger(__name__)
# DCP in one process without a process group (strategy=single, export) is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

WEIGHTS = "weights"
DEEPSPEED = "deepspeed"
EMA_FILE = "ema.pt"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The units of FSDP sharding, activation checkpointing and compile, as the model lists them (none for a
    model without `transformer_blocks()`)."""
    return model.transformer_blocks() if hasattr(model, "transformer_blocks") else []


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block's forward in torch.utils.checkpoint (parameter names unchanged); returns the count."""
    blocks = transformer_blocks(model)
    for block in blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    return len(blocks)


def compile_blocks(model: nn.Module) -> None:
    for block in transformer_blocks(model):
        block.compile()


class Strategy:
    """single: the base every strategy refines."""

    name = "single"

    def __init__(
        self,
        model: nn.Module,
        optim_cfg: OptimConfig,
        train_cfg: TrainConfig,
        dist_info: Dist,
        amp_dtype: torch.dtype | None,
        use_ema: bool,
    ):
        self.cfg = train_cfg
        self.dist = dist_info
        self.amp_dtype = amp_dtype
        on_meta = any(p.is_meta for p in model.parameters())
        self.model = model if on_meta else model.to(dist_info.device)  # FSDP materialises a meta model
        if train_cfg.activation_checkpointing:
            n = apply_activation_checkpointing(self.model)
            log.info("activation checkpointing on %d blocks", n)
        if train_cfg.compile:
            compile_blocks(self.model)
        self.module = self.wrap(self.model)
        self.optimizer = self.build_optimizer(optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg)
        self.ema = self.build_ema() if use_ema else None

    # --- building --------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def build_optimizer(self, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
        return build_optimizer(self.model, optim_cfg)

    def build_ema(self) -> EMA:
        return EMA(self.model, self.cfg.ema_decay)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    # --- one optimizer step ----------------------------------------------------------------------------

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def no_sync(self, last_micro_step: bool):
        """Skip the gradient reduction on all but the last micro-batch of an accumulated step."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum_steps).backward()

    def step(self) -> torch.Tensor:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the norm over all shards
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return grad_norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # --- checkpoints ------------------------------------------------------------------------------------

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        if self.ema is not None:
            state["ema"] = self.ema.shadow
        return state

    def save(self, folder: Path) -> None:
        """Write this rank's part of the weights, optimizer and EMA under `folder` (every rank calls it)."""
        import torch.distributed.checkpoint as dcp

        with _single_process_dcp():
            dcp.save(self._dcp_state(), checkpoint_id=str(folder / WEIGHTS))

    def check_resumable(self, folder: Path, saved_strategy: str, saved_world_size: int) -> None:
        """Raise CheckpointError unless `load` can read the step folder `saved_strategy` wrote on saved_world_size
        ranks: a DCP checkpoint of single, ddp or fsdp, on any number of ranks (DCP reshards)."""
        if not (folder / WEIGHTS).is_dir():
            raise CheckpointError(
                f"{folder} was written by train.strategy={saved_strategy}, which train.strategy={self.name} cannot "
                "read; resume with the strategy that wrote it (DeepSpeed checkpoints need train.strategy=deepspeed)"
            )

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()
        try:
            with _single_process_dcp():
                dcp.load(state, checkpoint_id=str(folder / WEIGHTS))
        except (Exception, CheckpointException) as err:  # missing keys, shape mismatch, truncated files
            raise CheckpointError(f"{folder / WEIGHTS} cannot be loaded into this model: {dcp_failure(err)}") from None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if self.ema is not None:
            self.ema.shadow = state["ema"]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on the CPU, on rank 0 (None on other ranks)."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return state if self.dist.is_main else None

    def full_ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.ema is None:
            return None
        state = {k: _full(v).cpu() for k, v in self.ema.shadow.items()}
        return state if self.dist.is_main else None


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, last_micro_step: bool):
        return contextlib.nullcontext() if last_micro_step else self.module.no_sync()


class FSDPStrategy(Strategy):
    name = "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(
            param_dtype=self.amp_dtype,
            reduce_dtype=torch.bfloat16 if self.cfg.reduce_dtype == "bf16" else torch.float32,
            # Counts and library sizes must stay float32 (bf16 rounds 1234 to 1232); autocast casts what
            # the matmuls need.
            cast_forward_inputs=False,
        )
        kwargs = {"mp_policy": policy, "reshard_after_forward": self.cfg.reshard_after_forward}
        for block in transformer_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        if any(p.is_meta for p in model.parameters()):
            # Built on the meta device: allocate only this rank's shards, then initialise them.
            model.to_empty(device=self.dist.device)
            with torch.no_grad():
                model.init_weights()
        return model

    def no_sync(self, last_micro_step: bool):
        self.model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)  # collective: every rank calls it
        return state if self.dist.is_main else None


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def wrap(self, model: nn.Module) -> nn.Module:
        return model  # the engine is built with the optimizer, in build_optimizer

    def deepspeed_config(self) -> dict:
        cfg = self.cfg
        zero: dict = {"stage": cfg.zero_stage}
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.dist.device.type == "cuda"}
        return {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum_steps,
            "gradient_clipping": cfg.grad_clip,
            "bf16": {"enabled": self.amp_dtype == torch.bfloat16},
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # our torch AdamW: no DeepSpeed op to compile
            # ... also with the optimizer states offloaded to the CPU (else DeepSpeed demands its CPUAdam).
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def build_optimizer(self, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("train.strategy=deepspeed needs DeepSpeed: pip install -e '.[dist]'") from None
        optimizer = build_optimizer(self.model, optim_cfg)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=self.deepspeed_config(), dist_init_required=False
        )
        self.module = self.engine
        return optimizer  # the schedule drives its param groups' lr, which DeepSpeed's wrapper reads

    def zero_grad(self) -> None:
        pass  # engine.step() zeroes the gradients after stepping

    def no_sync(self, last_micro_step: bool):
        # Told the boundary, the engine reduces gradients on the last micro-batch only, and one engine.step()
        # per optimizer step clips, steps and zeroes them (else it counts micro-steps, stepped after each).
        self.engine.set_gradient_accumulation_boundary(last_micro_step)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself

    def step(self) -> torch.Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return torch.as_tensor(float(norm) if norm is not None else float("nan"))

    def _gathered(self):
        """ZeRO-3 partitions the weights: gather them to read the whole model (a no-op for stages 1, 2)."""
        if self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))

    def build_ema(self) -> EMA:
        return EMA(self.model, self.cfg.ema_decay, tensors=held_tensors)

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder / DEEPSPEED), tag="state")
        if self.ema is None:
            return
        shapes = partitioned_shapes(self.model)
        shadow = self.ema.shadow
        if self.dist.is_main:
            replicated = {k: v for k, v in shadow.items() if k not in shapes}
            state = {
                **self.ema.state_dict(),
                "shadow": replicated,
                "full_shapes": shapes,
                "ranks": self.dist.world_size,
            }
            torch.save(state, folder / EMA_FILE)
        if shapes:
            torch.save({k: shadow[k] for k in shapes}, folder / ema_rank_file(self.dist.rank))

    def check_resumable(self, folder: Path, saved_strategy: str, saved_world_size: int) -> None:
        """Only DeepSpeed's own checkpoints, on the number of ranks that wrote them (ZeRO partitions are per rank)."""
        if saved_strategy != self.name or not (folder / DEEPSPEED).is_dir():
            raise CheckpointError(
                f"{folder} was written by train.strategy={saved_strategy}; train.strategy=deepspeed resumes only "
                "its own checkpoints: resume with the strategy that wrote it"
            )
        if saved_world_size != self.dist.world_size:
            raise CheckpointError(
                f"{folder} is a DeepSpeed checkpoint of {saved_world_size} ranks; it resumes on "
                f"{saved_world_size} ranks only (now {self.dist.world_size})"
            )

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(folder / DEEPSPEED), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(f"{folder / DEEPSPEED} holds no DeepSpeed checkpoint")
        if self.ema is not None:
            self._load_ema(folder)

    def _load_ema(self, folder: Path) -> None:
        state = torch.load(folder / EMA_FILE, map_location=self.dist.device, weights_only=True)
        shadow = dict(state["shadow"])
        if state.get("full_shapes"):
            own = folder / ema_rank_file(self.dist.rank)
            shadow.update(torch.load(own, map_location=self.dist.device, weights_only=True))
        expected = {k: v.shape for k, v in self.ema.shadow.items()}
        if {k: v.shape for k, v in shadow.items()} != expected:
            raise CheckpointError(
                f"the EMA in {folder} does not match this run's EMA tensors (written under another "
                "train.zero_stage?); resume with the settings that wrote it"
            )
        self.ema.load_state_dict({**state, "shadow": {k: shadow[k] for k in expected}})

    def full_ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole EMA on rank 0: the ZeRO-3 partitions are gathered there, one tensor at a time (a collective)."""
        if self.ema is None:
            return None
        shapes = partitioned_shapes(self.model)
        main = self.dist.is_main
        state = {}
        for key, value in self.ema.shadow.items():
            if key in shapes:
                parts = [torch.empty_like(value) for _ in range(self.dist.world_size)] if main else None
                dist.gather(value, parts, dst=0)
                value = unpartitioned(parts, shapes[key]) if main else value
            if main:
                state[key] = value.cpu()
        return state if main else None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        with self._gathered():
            state = {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.amp_dtype is not None:
            # Under bf16 the engine's module holds bf16 copies: export the optimizer's fp32 master weights
            # (as `scldm-scale export` does from the ZeRO files). A collective under ZeRO-3.
            from deepspeed.utils import safe_get_full_fp32_param

            for name, param in self.model.named_parameters(remove_duplicate=False):
                state[name] = safe_get_full_fp32_param(param).detach().float().cpu().clone()
        return state if self.dist.is_main else None


@contextlib.contextmanager
def _single_process_dcp():
    """DCP warns at every save and load without a process group that it assumes one process; a single-process
    run is one by design, so that warning is silenced (and only that one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def held_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict's tensors as this rank holds them: under ZeRO-3 a parameter is its flat partition
    (`ds_tensor`: elements [r * P, (r + 1) * P) of the flattened parameter on rank r, zero-padded at the end),
    elsewhere the tensor itself."""
    return {k: getattr(v, "ds_tensor", v) for k, v in model.state_dict(keep_vars=True).items()}


def partitioned_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The full shape of every state-dict entry ZeRO-3 partitions (none under ZeRO-1/2)."""
    return {
        k: list(v.ds_shape)
        for k, v in model.state_dict(keep_vars=True).items()
        if getattr(v, "ds_tensor", None) is not None
    }


def unpartitioned(parts: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
    """A ZeRO-3 parameter from its flat partitions in rank order (the padding of the last ones dropped)."""
    return torch.cat(parts)[: math.prod(shape)].view(shape)


def ema_rank_file(rank: int) -> str:
    return f"ema-rank{rank}.pt"


def ema_from_files(folder: Path) -> dict[str, torch.Tensor]:
    """The whole EMA of a DeepSpeed step folder, on the CPU: rank 0's tensors, and each ZeRO-3 partitioned
    tensor joined from every rank's file."""
    state = torch.load(folder / EMA_FILE, map_location="cpu", weights_only=True)
    shapes = state.get("full_shapes") or {}
    files = [folder / ema_rank_file(r) for r in range(state.get("ranks", 0) if shapes else 0)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{folder} lacks the EMA partitions {missing}; is the step folder complete?")
    parts = [torch.load(path, map_location="cpu", weights_only=True) for path in files]
    joined = {k: unpartitioned([part[k] for part in parts], shape) for k, shape in shapes.items()}
    return {**state["shadow"], **joined}


STRATEGIES = {s.name: s for s in (Strategy, DDPStrategy, FSDPStrategy, DeepSpeedStrategy)}


def build_strategy(model: nn.Module, optim_cfg: OptimConfig, train_cfg: TrainConfig, **kwargs) -> Strategy:
    """The strategy train_cfg.strategy names (keyword arguments: dist_info, amp_dtype, use_ema)."""
    if train_cfg.strategy != "single" and not dist.is_initialized():
        raise RuntimeError(f"train.strategy={train_cfg.strategy} needs the process group (distributed.setup) first")
    return STRATEGIES[train_cfg.strategy](model, optim_cfg, train_cfg, **kwargs)
