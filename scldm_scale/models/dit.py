"""Diffusion Transformer prior over the VAE's M latent tokens, conditioned on cell labels.

Unusual here:
- adaLN-Zero (DiT): each block's shift/scale/gate for attention and MLP come from SiLU -> Linear of the
  conditioning vector, zero-initialised along with the final projection, so every block starts as the
  identity and the network starts by predicting zero velocity.
- The conditioning vector = timestep embedding + sum over condition keys of a class embedding. Each
  table has one extra row, the NULL token (index = number of classes), used for classifier-free
  guidance; `drop_conditions` replaces labels by NULL during training.
- Fixed 1-D sin-cos positional embedding over the M latent tokens (they are ordered by the VAE's
  inducing points, unlike gene tokens).
- The model reports its own cost: `transformer_blocks()`, `forward_flops()` and `activation_profile()` per
  cell (conventions in cost.py). The adaLN modulation is per cell, not per token: one conditioning vector
  per cell. Class embeddings are lookups (no FLOPs).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scldm_scale.config import PriorConfig
from scldm_scale.models.cost import ActivationProfile, linear_flops
from scldm_scale.models.mcab import Attention

TIME_FREQUENCIES = 256  # sinusoidal features of t in [0, 1], as in DiT
TIME_SCALE = 1000.0  # t in [0, 1] is stretched to DiT's [0, 1000] range before the sinusoids


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) -> (N, dim) cos/sin features with geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


class TimestepEmbedder(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t * TIME_SCALE, TIME_FREQUENCIES))  # (B, D)

    def flops(self) -> float:
        return linear_flops(self.mlp[0], 1) + linear_flops(self.mlp[2], 1)  # one timestep per cell


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, M, D)


class DiTBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d_model, n_heads)
        self.norm_mlp = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_model))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada_ln(c).chunk(6, dim=-1)  # (B, D) each
        h = modulate(self.norm_attn(x), shift_a, scale_a)
        x = x + gate_a[:, None] * self.attn(h, h)
        return x + gate_m[:, None] * self.mlp(modulate(self.norm_mlp(x), shift_m, scale_m))

    def flops(self, n_tokens: int) -> float:
        mlp = linear_flops(self.mlp[0], n_tokens) + linear_flops(self.mlp[2], n_tokens)
        return linear_flops(self.ada_ln[-1], 1) + self.attn.flops(n_tokens, n_tokens) + mlp

    def activations(self, n_tokens: int) -> tuple[int, int]:
        """(saved, input) elements per cell: M (12D + 2F), a self-attention block's 8D with the adaLN
        modulation (3 more D-wide tensors per half) and a GELU MLP of width F (its input and output)."""
        d, f = self.mlp[0].in_features, self.mlp[0].out_features
        return n_tokens * (12 * d + 2 * f), n_tokens * d


class DiT(nn.Module):
    def __init__(self, cfg: PriorConfig, n_tokens: int, token_dim: int, n_classes: dict[str, int]):
        super().__init__()
        d = cfg.d_model
        self.n_classes = dict(n_classes)
        self.x_embed = nn.Linear(token_dim, d)
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.register_buffer("pos_embed", sinusoidal_embedding(torch.arange(n_tokens), d)[None], persistent=False)
        self.t_embed = TimestepEmbedder(d)
        self.cond_embed = nn.ModuleDict({k: nn.Embedding(n + 1, d) for k, n in n_classes.items()})
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final = nn.Linear(d, token_dim)
        self._init_weights()

    @property
    def null_ids(self) -> dict[str, int]:
        return dict(self.n_classes)

    def transformer_blocks(self) -> list[nn.Module]:
        """The DiT blocks: the units of FSDP sharding and activation checkpointing."""
        return list(self.blocks)

    def forward_flops(self) -> float:
        """Per cell, on its M latent tokens of width L."""
        m = self.n_tokens
        flops = self.t_embed.flops() + linear_flops(self.x_embed, m)
        flops += sum(block.flops(m) for block in self.blocks)
        return flops + linear_flops(self.final_ada_ln[-1], 1) + linear_flops(self.final, m)

    def activation_profile(self) -> ActivationProfile:
        """Saved elements per cell, the loss's left to its caller."""
        d = self.x_embed.out_features
        # timestep features and MLP (256 + 3D); latents in, final norm, modulation and projection out (M (3D + 2L))
        outside = TIME_FREQUENCIES + 3 * d + self.n_tokens * (3 * d + 2 * self.token_dim)
        return ActivationProfile.from_blocks([block.activations(self.n_tokens) for block in self.blocks], outside, 0)

    def init_weights(self) -> None:
        """Re-initialise after FSDP's meta-device construction (train.init_on_meta), buffer included."""
        device = self.pos_embed.device
        self.pos_embed = sinusoidal_embedding(torch.arange(self.n_tokens), self.x_embed.out_features)[None].to(device)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for table in self.cond_embed.values():
            nn.init.normal_(table.weight, std=0.02)
        for layer in self.t_embed.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: modulation and output start at zero, so each block is the identity at init.
        for block in self.blocks:
            nn.init.zeros_(block.ada_ln[-1].weight)
            nn.init.zeros_(block.ada_ln[-1].bias)
        nn.init.zeros_(self.final_ada_ln[-1].weight)
        nn.init.zeros_(self.final_ada_ln[-1].bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity for latents x (B, M, L) at times t (B,); a key missing from conditions is NULL."""
        c = self.t_embed(t)  # (B, D)
        for key, table in self.cond_embed.items():
            ids = conditions.get(key)
            if ids is None:
                ids = torch.full((x.shape[0],), self.n_classes[key], dtype=torch.long, device=x.device)
            c = c + table(ids)  # (B, D)
        h = self.x_embed(x) + self.pos_embed  # (B, M, D)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada_ln(c).chunk(2, dim=-1)  # (B, D) each
        return self.final(modulate(self.final_norm(h), shift, scale))  # (B, M, L)


def drop_conditions(
    conditions: dict[str, torch.Tensor], null_ids: dict[str, int], p: float, mode: str, generator=None
) -> dict[str, torch.Tensor]:
    """Replace labels by NULL for classifier-free guidance training.

    independent: each key of each cell is dropped with probability p.
    one_at_a_time: per cell, one key chosen at random stays (dropped with probability p), all others
        are NULL, so the model learns every single-condition velocity v_k used by compositional CFG.
    joint: all keys of a cell are dropped together with probability p.
    """
    keys = list(conditions)
    if not keys:
        return {}
    n = conditions[keys[0]].shape[0]
    device = conditions[keys[0]].device

    def bernoulli(shape) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device) < p

    if mode == "independent":
        drop = {k: bernoulli(n) for k in keys}
    elif mode == "joint":
        shared = bernoulli(n)
        drop = {k: shared for k in keys}
    elif mode == "one_at_a_time":
        active = torch.randint(len(keys), (n,), generator=generator, device=device)
        dropped_active = bernoulli(n)
        drop = {k: (active != i) | dropped_active for i, k in enumerate(keys)}
    else:
        raise ValueError(f"unknown condition dropout mode {mode!r}")
    return {k: torch.where(drop[k], torch.full_like(v, null_ids[k]), v) for k, v in conditions.items()}
