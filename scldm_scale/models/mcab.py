"""Transformer blocks shared by the VAE: multi-head attention, SwiGLU MLP, self-attention block and
MCAB, the Multi-head Cross-Attention Block.

Unusual here:
- MCAB normalises queries and keys/values with separate LayerNorms and adds the attention output to the
  *raw* queries (pre-norm residual), so the same block pools (M learned queries over G gene tokens) and
  unpools (G gene queries over M latent tokens).
- Key padding masks are real: padded gene tokens get no attention weight, so a cell encodes the same
  however much padding its batch adds (the published reference pads without a mask).
- Queries may have batch size 1 (shared by all cells): they are normalised and projected once.
- Cross-attention runs through SDPA or, with kernel="pooling" / "unpooling" (model.attention_backend =
  triton), through the fused Triton kernels of scldm_kernels.mcab_attention, which take the (B, L, H, Dh)
  projections as views and read a batch-1 query without expanding it.
- No biases anywhere, SwiGLU hidden width mlp_ratio * d rounded up to a multiple of 8.
- Each module reports its forward FLOPs and the activations it saves per cell (`flops`, `activations`;
  conventions in cost.py), read from its own layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scldm_scale.models.cost import attention_flops, linear_flops


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

    def flops(self, n_tokens: float) -> float:
        return sum(linear_flops(layer, n_tokens) for layer in (self.w_gate, self.w_up, self.w_down))


def fused_cross_attention(kernel: str) -> Callable[..., torch.Tensor]:
    """The Triton op for "pooling" (few queries over many keys), "unpooling" (many queries over few keys) or
    "pooling_folded" (pooling over the tokens themselves, for the folded K/V projections).

    Imported only when asked for, so the torch backend never needs scldm_kernels or Triton.
    """
    from scldm_kernels import mcab_attention

    ops = {
        "pooling": mcab_attention.pooling_attention,
        "unpooling": mcab_attention.unpooling_attention,
        "pooling_folded": mcab_attention.folded_pooling_attention,
    }
    if kernel not in ops:
        raise ValueError(f"unknown cross-attention kernel {kernel!r}; expected one of {sorted(ops)}")
    return ops[kernel]


class Attention(nn.Module):
    """Multi-head attention of queries x_q onto keys/values x_kv with an optional key padding mask.

    kernel: None for SDPA, "pooling" / "unpooling" for the fused Triton cross-attention, or "pooling_folded":
    the same function as pooling with the key projection folded into the (few, shared) queries and the value
    projection applied after the weighted sum, so K and V are never formed for the gene tokens. It costs
    4·B·H·M·S·E instead of 4·B·S·E² + 4·B·M·S·E FLOPs forward (fewer when H·M < E + M) and stores no K/V.
    """

    def __init__(self, d_model: int, n_heads: int, kernel: str | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.w_out = nn.Linear(d_model, d_model, bias=False)
        self.kernel = kernel
        self._fused = None if kernel is None else fused_cross_attention(kernel)

    def forward(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """key_bias (B, K), SDPA only: added to every query's attention logit of each key (log of a key weight)."""
        h = self.n_heads
        if key_bias is not None and self.kernel is not None:
            raise ValueError("key_bias needs the SDPA path (attention_backend=torch)")
        if self.kernel == "pooling_folded":
            return self._folded_pooling(x_q, x_kv, key_mask)
        q = self.w_q(x_q)  # (B, Q, D)
        k, v = self.w_kv(x_kv).chunk(2, dim=-1)  # (B, K, D) each
        if self._fused is not None:
            q = q.unflatten(-1, (h, -1))  # (1 or B, Q, H, Dh), never expanded
            k = k.unflatten(-1, (h, -1))  # (B, K, H, Dh), a view of the fused projection
            v = v.unflatten(-1, (h, -1))  # (B, K, H, Dh)
            out = self._fused(q, k, v, key_mask)  # (B, Q, H, Dh)
            return self.w_out(out.flatten(-2))  # (B, Q, D)
        # Queries shared by every cell (pooling's inducing points, unpooling's gene embeddings) arrive
        # with batch 1: project once, then broadcast.
        q = q.expand(x_kv.shape[0], -1, -1)  # (B, Q, D)
        q = q.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, Q, Dh)
        k = k.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, K, Dh)
        v = v.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, H, K, Dh)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, K), True = attend
        if key_bias is not None:
            bias = key_bias.to(q.dtype)
            bias = bias if key_mask is None else bias.masked_fill(~key_mask, float("-inf"))
            attn_mask = bias[:, None, None, :]  # (B, 1, 1, K), added to the logits
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, Q, Dh)
        return self.w_out(out.transpose(1, 2).flatten(-2))  # (B, Q, D)

    def _folded_pooling(self, x_q: torch.Tensor, x_kv: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """q_h·(W_k,h x) = (W_k,hᵀ q_h)·x and Σ p (W_v,h x) = W_v,h (Σ p x): attend over the tokens x directly."""
        h = self.n_heads
        w_k, w_v = self.w_kv.weight.chunk(2, dim=0)  # (D, E) each, rows ordered (head, Dh)
        q = self.w_q(x_q).unflatten(-1, (h, -1))  # (1 or B, M, H, Dh)
        q_folded = torch.einsum("bmhd,hde->bmhe", q, w_k.unflatten(0, (h, -1)))  # (1 or B, M, H, E)
        x_kv = x_kv.to(q_folded.dtype)  # under autocast: the dtype the K/V projection would have produced
        pooled = self._fused(q_folded, x_kv, key_mask, scale=q.shape[-1] ** -0.5)  # (B, M, H, E)
        out = torch.einsum("bmhe,hde->bmhd", pooled, w_v.unflatten(0, (h, -1)))  # (B, M, H, Dh)
        return self.w_out(out.flatten(-2))  # (B, M, D)

    def flops(self, n_queries: float, n_keys: float, query_batch: int = 1) -> float:
        """Forward FLOPs per cell, as unfolded attention (the folded pooling does fewer). Queries shared by a
        batch of query_batch cells (batch 1) are projected once for all of them."""
        q = linear_flops(self.w_q, n_queries) / query_batch
        attn = attention_flops(n_queries, n_keys, self.w_q.out_features)
        return q + linear_flops(self.w_kv, n_keys) + attn + linear_flops(self.w_out, n_queries)


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

    def flops(self, n_tokens: float) -> float:
        return self.attn.flops(n_tokens, n_tokens) + self.mlp.flops(n_tokens)

    def activations(self, n_tokens: int) -> tuple[int, int]:
        """(saved, input) elements per cell: T (8E + 4H) = block input, normed input, q, k, v, attention output,
        MLP input, normed MLP input, and 4H for the SwiGLU gate, up, SiLU and product."""
        e, h = self.mlp.w_gate.in_features, self.mlp.w_gate.out_features
        return n_tokens * (8 * e + 4 * h), n_tokens * e


class MCAB(nn.Module):
    """Cross-attention block: queries attend over a key/value set, then an MLP; both residual.

    MCAB(X, Q) = Q' + MLP(LN(Q')),  Q' = Q + Attn(LN_q(Q), LN_kv(X), mask)
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, kernel: str | None = None):
        super().__init__()
        self.norm_q = nn.LayerNorm(d_model, bias=False)
        self.norm_kv = nn.LayerNorm(d_model, bias=False)
        self.attn = Attention(d_model, n_heads, kernel)
        self.norm_mlp = nn.LayerNorm(d_model, bias=False)
        self.mlp = SwiGLU(d_model, mlp_ratio)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = queries + self.attn(self.norm_q(queries), self.norm_kv(keys), key_mask, key_bias)
        return x + self.mlp(self.norm_mlp(x))

    def flops(self, n_queries: float, n_keys: float, batch_size: int) -> float:
        """Per cell; the queries (inducing points, gene embeddings) are shared by the batch of batch_size cells."""
        return self.attn.flops(n_queries, n_keys, query_batch=batch_size) + self.mlp.flops(n_queries)

    def activations(self, n_queries: int, n_keys: int) -> tuple[int, int]:
        """(saved, input) elements per cell: 4KE (keys, normed keys, k, v) + Q (4E + 4H) (q, attention output,
        residual, normed, and the SwiGLU's 4H); the input is the keys, the queries being shared by all cells."""
        e, h = self.mlp.w_gate.in_features, self.mlp.w_gate.out_features
        return 4 * n_keys * e + n_queries * (4 * e + 4 * h), n_keys * e
