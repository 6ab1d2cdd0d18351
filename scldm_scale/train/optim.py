"""AdamW with decoupled weight decay on matrices only, and the two learning-rate schedules.

wsd (warmup-stable-decay, the reference VAE recipe): linear warmup over warmup_frac of the steps,
constant, then over the last decay_frac a 1 - sqrt decay down to min_lr_ratio.
cosine (the reference DiT recipe): linear warmup, then cosine from 1 to min_lr_ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from scldm_scale.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Norm gains, biases, embedding tables and per-gene scalars are not decayed.
        is_matrix = param.ndim >= 2 and "embed" not in name and "inducing" not in name
        (decay if is_matrix else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_multiplier(cfg: OptimConfig) -> Callable[[int], float]:
    total = cfg.max_steps
    warmup = max(1, int(cfg.warmup_frac * total))
    decay = int(cfg.decay_frac * total)

    def wsd(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == 0 or step < total - decay:
            return 1.0
        progress = (step - (total - decay)) / decay
        return 1.0 - (1.0 - cfg.min_lr_ratio) * math.sqrt(min(progress, 1.0))

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(1, total - warmup), 1.0)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return wsd if cfg.schedule == "wsd" else cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an EMA averages by default: the model's state dict, as this process holds it."""
    return model.state_dict()


class EMA:
    """Exponential moving average of a model's weights (fp32 shadow copies), used for sampling.

    The shadow starts equal to the weights; the effective decay is min(decay, (1 + n) / (10 + n)) so a
    short run is not dominated by the initialisation. It averages `tensors(model)` (default: the state
    dict) as this process holds them, so it is partitioned like the weights: DTensor shards under FSDP,
    each rank's flat partition of every parameter under ZeRO-3 (the strategy's `tensors`), never gathered
    to be updated. One multi-tensor lerp (torch._foreach_lerp_) updates every floating-point tensor.
    """

    def __init__(self, model: nn.Module, decay: float, tensors=state_tensors):
        self.decay = decay
        self.n_updates = 0
        self.tensors = tensors
        self.shadow = {k: v.detach().float().clone() for k, v in tensors(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.n_updates += 1
        decay = min(self.decay, (1 + self.n_updates) / (10 + self.n_updates))
        current = self.tensors(model)
        floats = [k for k, v in current.items() if v.dtype.is_floating_point]
        # A DTensor's local shard: the foreach kernels run on plain tensors, each rank on what it holds.
        shadows = [_local(self.shadow[k]) for k in floats]
        torch._foreach_lerp_(shadows, [_local(current[k]).float() for k in floats], 1.0 - decay)
        for key, value in current.items():
            if not value.dtype.is_floating_point:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "n_updates": self.n_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.n_updates, self.shadow = state["decay"], state["n_updates"], state["shadow"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
