"""The stage-2 objective: flow matching of a conditional DiT on (standardised) VAE latents.

Each step draws t ~ U[0, 1] and noise x0, forms x_t = t x1 + (1 - t) x0 (SiT convention, see
transport.py), drops condition labels to NULL for classifier-free guidance, and regresses the DiT's
output on the velocity x1 - x0. Its cost is the DiT's (`transformer_blocks`, `forward_flops`), plus the fp32
tensors of the loss in `activation_profile`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from scldm_scale.models.cost import ActivationProfile
from scldm_scale.models.dit import DiT, drop_conditions
from scldm_scale.models.transport import LinearInterpolant

# fp32 (B, M, L) tensors the flow-matching loss keeps for the backward pass: noise, interpolant, target, error.
LOSS_FP32_TEMPORARIES = 4


@dataclass
class LatentBatch:
    latents: torch.Tensor  # (B, M, L) standardised VAE latents
    conditions: dict[str, torch.Tensor]  # key -> (B,) long

    def to(self, device: torch.device | str) -> LatentBatch:
        return LatentBatch(self.latents.to(device), {k: v.to(device) for k, v in self.conditions.items()})

    @property
    def size(self) -> int:
        return self.latents.shape[0]


class FlowMatchingPrior(nn.Module):
    def __init__(self, dit: DiT, cond_drop_prob: float, cond_dropout: str):
        super().__init__()
        self.dit = dit
        self.interpolant = LinearInterpolant()
        self.cond_drop_prob = cond_drop_prob
        self.cond_dropout = cond_dropout

    def init_weights(self) -> None:
        self.dit.init_weights()

    def transformer_blocks(self) -> list[nn.Module]:
        return self.dit.transformer_blocks()

    def forward_flops(self) -> float:
        return self.dit.forward_flops()

    def activation_profile(self) -> ActivationProfile:
        profile = self.dit.activation_profile()
        loss = LOSS_FP32_TEMPORARIES * self.dit.n_tokens * self.dit.token_dim  # (M, L) each
        return replace(profile, outside_fp32=profile.outside_fp32 + loss)

    def forward(self, batch: LatentBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        conditions = drop_conditions(batch.conditions, self.dit.null_ids, self.cond_drop_prob, self.cond_dropout)
        per_cell = self.interpolant.loss(lambda x, t: self.dit(x, t, conditions), batch.latents)  # (B,)
        loss = per_cell.mean()
        return loss, {"fm_loss": loss.detach()}
