"""Transformer blocks shared by the VAE: multi-head attention, SwiGLU MLP, self-attention block and
MCAB, the Multi-head Cross-Attention Block.

Unusual here:
- MCAB normalises queries and keys/values with separate LayerNorms and adds the attention output to the
  *raw* queries (pre-norm residual), so the same block pools (M learned queries over G gene tokens) and
  unpools (G gene queries over M latent tokens).
- Key padding masks are real: padded gene tokens get no attention weight, so a cell encodes the same
  however much padding its batch adds (the published reference pads without a mask).
- Queries may have batch size 1 (shared by all cells): they are normalised and projected once.
- No biases anywhere, SwiGLU hidden width mlp_ratio * d rounded up to a multiple of 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_dim(d_model: int, mlp_ratio: float) -> int:
    """mlp_ratio * d_model rounded up to a multiple of 8 (tensor-core friendly)."""
    return 8 * ((int(mlp_ratio * d_model) + 7) // 8)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, mlp_ratio: float):
        super().__init__()
        hidden = swiglu_hidden_dim(d_model, mlp_ratio)
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Attention(nn.Module):
    """Multi-head attention of queries x_q onto keys/values x_kv with an optional key padding mask."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.w_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.n_heads
        q = self.w_q(x_q)  # (B, Q, D)
        k, v = self.w_kv(x_kv).chunk(2, dim=-1)  # (B, K, D) each
        # Queries shared by every cell (pooling's inducing points, unpooling's gene embeddings) arrive
        # with batch 1: project once, then broadcast.
        q = q.expand(x_kv.shape[0], -1, -1)  # (B, Q, D)
        q = q.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, Q, Dh)
        k = k.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, K, Dh)
        v = v.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, K, Dh)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, K), True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, Q, Dh)
        return self.w_out(out.transpose(1, 2).flatten(-2))  # (B, Q, D)


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block over a token set (no positional information: set-equivariant)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model, bias=False)
        self.attn = Attention(d_model, n_heads)
        self.norm_mlp = nn.LayerNorm(d_model, bias=False)
        self.mlp = SwiGLU(d_model, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_attn(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.norm_mlp(x))


class MCAB(nn.Module):
    """Cross-attention block: queries attend over a key/value set, then an MLP; both residual.

    MCAB(X, Q) = Q' + MLP(LN(Q')),  Q' = Q + Attn(LN_q(Q), LN_kv(X), mask)
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(d_model, bias=False)
        self.norm_kv = nn.LayerNorm(d_model, bias=False)
        self.attn = Attention(d_model, n_heads)
        self.norm_mlp = nn.LayerNorm(d_model, bias=False)
        self.mlp = SwiGLU(d_model, mlp_ratio)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = queries + self.attn(self.norm_q(queries), self.norm_kv(keys), key_mask)
        return x + self.mlp(self.norm_mlp(x))
