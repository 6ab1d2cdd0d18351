"""Fused MCAB cross-attention: pooling (few queries over many keys) and unpooling (many queries over few keys).

Both ops compute softmax(q kᵀ · scale, keys masked) v per (cell, head) on one layout, with any strides:

    q         (Bq, Lq, H, D)  Bq = 1 (queries shared by every cell: MCAB's inducing points or gene
                              embeddings, never expanded) or Bq = B
    k, v      (B,  Lk, H, D)  the layout `Linear(...).unflatten(-1, (H, D))` gives, no transposes
    key_mask  (B,  Lk) bool   True = attend; None = every key
    out       (B,  Lq, H, D)  in q's dtype; a cell whose keys are all masked gets zeros (and zero gradients),
                              as torch's SDPA returns on CPU

- `pooling_attention` (M ≈ 4–128 queries, Lk up to ~20k keys): all queries of a (cell, head) in one tile,
  keys streamed in blocks with an online softmax; the key axis is split across programs when cells × heads
  cannot fill the GPU, and a combine kernel merges the splits by their log-sum-exp. The backward walks the
  same key blocks, writes dK/dV directly (each key block belongs to one program) and accumulates dQ in
  registers: one fp32 partial per (cell, split) summed afterwards, never a score matrix.
- `unpooling_attention` (G queries, Lk ≤ 256 keys): one program per (gene block, cell, head) holds all keys
  and values and takes an exact single-tile softmax — no log-sum-exp is stored, the backward recomputes it,
  and Δ = rowsum(dO ⊙ O) = rowsum(P ⊙ dP) comes from the tile, so the backward never reads O (the largest
  tensor here, B · G · E). The backward is two kernels: dK/dV per (cell, head, gene split) looping over gene
  blocks, and dQ per (gene block, head) looping over the cells that share the query, so dQ of shared queries
  is summed over cells in registers instead of through a (B, G, H, D) buffer.
- `folded_pooling_attention`: pooling whose keys and values are the tokens themselves for every head (the
  K/V projections folded into the queries and applied after the sum; see MCAB kernel="pooling_folded").

Numerics: fp32/bf16/fp16 inputs accumulate in fp32, float64 inputs in float64 (for gradcheck under the
interpreter; on a GPU float64 falls back to the reference: Triton's fp64 MMA rejects these tiles). On a GPU
16-bit operands go to tl.dot as they are (tensor cores) and fp32 dots use IEEE precision (no TF32); under
TRITON_INTERPRET=1 every load is cast to the accumulation type at once, because the interpreter computes raw
bf16 wrongly. The streamed block (BLOCK_K of pooling, BLOCK_Q of unpooling) and the warp count are autotuned
on a GPU, keyed on the tile sizes but not on the streamed length (the padded gene count changes every batch);
the interpreter gets one 16-wide config, so small test shapes still loop over several blocks.

Fallback: when Triton is not installed, or the tensors live on a device Triton cannot run on (CPU without
TRITON_INTERPRET=1), the ops warn once and run `attention_reference` — slow and memory-hungry, never silent.

Benchmarks (`scldm-scale bench kernels`, `scldm_scale/bench/mcab_attention.py`) time these kernels against
every available SDPA backend and compiled FlexAttention; this file holds no timing code.
"""

from __future__ import annotations

from typing import Any

import torch

from ._triton import (
    HAS_TRITON,
    INTERPRETING,
    autotune_configs,
    kernel_unavailable_reason,
    tl,
    triton,
    warn_fallback_once,
)

_MAX_HEAD_DIM = 256
_MAX_POOLING_QUERIES = 128  # all queries of a (cell, head) live in one register tile
_MAX_UNPOOLING_KEYS = 256  # all keys and values of a (cell, head) live in one register tile
_MAX_FOLDED_DIM = 512  # folded pooling's tiles span the model width E
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------------------
# PyTorch reference (tests and benchmarks import it)
# ---------------------------------------------------------------------------------------------------------


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v on the layout of this module, in the inputs' dtype; masked-out cells get zeros.

    The softmax is written out (not SDPA) so a cell without keys has a zero output and zero, not NaN,
    gradients: masked scores become -inf only after the (detached) row maximum is subtracted.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Lq, Lk); q broadcasts over cells
    if key_mask is None:
        key_mask = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
    keep = key_mask[:, None, None, :]  # (B, 1, 1, Lk)
    row_max = scores.detach().masked_fill(~keep, float("-inf")).amax(-1, keepdim=True)  # (B, H, Lq, 1)
    row_max = row_max.nan_to_num(neginf=0.0)
    weights = (scores - row_max).masked_fill(~keep, float("-inf")).exp()  # (B, H, Lq, Lk)
    total = weights.sum(-1, keepdim=True)  # (B, H, Lq, 1)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, Lq, H, D)


if HAS_TRITON:
    # ---------------------------------------------------------------------------------------------------------
    # Triton kernels
    #
    # Pointer arguments: Q (Bq, Lq, H, D), K and V (B, Lk, H, D), MASK (B, Lk) as uint8 (unused when
    # HAS_MASK is False), OUT (B, Lq, H, D) or its per-split partial, LSE (B, [split,] H, Lq) in ACC.
    # Every tensor comes with its strides, so views (the chunks of a fused KV projection, a batch-1 query read
    # with batch stride 0, tokens shared by the heads with head stride 0) are read in place. Per-cell offsets
    # are formed in int64: B · Lk · H · D overflows int32.
    # Constexprs: HAS_MASK; DOT (dtype of the tl.dot operands), ACC (accumulation dtype), PRECISION (tl.dot
    # input precision: "ieee" for fp32/fp64, so no TF32); BLOCK_Q, BLOCK_K, BLOCK_D (powers of two ≥ 16).
    # ---------------------------------------------------------------------------------------------------------

    # The streamed block and the warp count, autotuned on a GPU; one 16-wide config under the interpreter, so
    # small test shapes still loop over several blocks. Folded pooling's tiles span the whole width E: smaller.
    _KEY_BLOCK_CONFIGS = autotune_configs(
        [triton.Config({"BLOCK_K": b}, num_warps=w) for b in (32, 64, 128) for w in (4, 8)],
        interpreter_config=triton.Config({"BLOCK_K": 16}),
    )
    _TOKEN_BLOCK_CONFIGS = autotune_configs(
        [triton.Config({"BLOCK_K": b}, num_warps=w) for b in (16, 32, 64) for w in (4, 8)],
        interpreter_config=triton.Config({"BLOCK_K": 16}),
    )
    _QUERY_BLOCK_CONFIGS = autotune_configs(
        [triton.Config({"BLOCK_Q": b}, num_warps=w) for b in (32, 64, 128) for w in (4, 8)],
        interpreter_config=triton.Config({"BLOCK_Q": 16}),
    )

    @triton.jit
    def _row_ptrs(P, b, h, rows, cols, stride_b, stride_h, stride_l, stride_d):
        """Pointers to rows × cols of P (·, L, H, D) at cell b, head h."""
        return P + b * stride_b + h * stride_h + rows[:, None] * stride_l + cols[None, :] * stride_d

    @triton.jit
    def _load_rows(
        P, b, h, rows, n_rows, head_dim, stride_b, stride_h, stride_l, stride_d,
        DTYPE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Rows `rows` (those < n_rows) of P (·, L, H, D) at cell b, head h: a zero-padded (rows, BLOCK_D) tile
        in DTYPE, converted right after the load (the interpreter computes raw bf16 wrongly)."""
        cols = tl.arange(0, BLOCK_D)
        ok = (rows < n_rows)[:, None] & (cols < head_dim)[None, :]
        ptrs = _row_ptrs(P, b, h, rows, cols, stride_b, stride_h, stride_l, stride_d)
        return tl.load(ptrs, mask=ok, other=0.0).to(DTYPE)

    @triton.jit
    def _store_rows(
        P, value, b, h, rows, n_rows, head_dim, stride_b, stride_h, stride_l, stride_d, BLOCK_D: tl.constexpr
    ):  # fmt: skip
        """Store a (rows, BLOCK_D) tile into the rows (< n_rows) of P (·, L, H, D) at cell b, head h."""
        cols = tl.arange(0, BLOCK_D)
        ok = (rows < n_rows)[:, None] & (cols < head_dim)[None, :]
        tl.store(
            _row_ptrs(P, b, h, rows, cols, stride_b, stride_h, stride_l, stride_d),
            value.to(P.dtype.element_ty),
            mask=ok,
        )

    @triton.jit
    def _kept_keys(MASK, b, offs, stop, stride_mb, stride_ml, HAS_MASK: tl.constexpr):
        """Which keys `offs` take part: below stop and, with a mask, marked True."""
        keep = offs < stop
        if HAS_MASK:
            keep = keep & (tl.load(MASK + b * stride_mb + offs * stride_ml, mask=offs < stop, other=0) != 0)
        return keep

    @triton.jit
    def _key_block_scores(
        q, K, V, MASK, b, h, offs, stop, head_dim, scale,
        stride_kb, stride_kl, stride_kh, stride_kd,
        stride_vb, stride_vl, stride_vh, stride_vd,
        stride_mb, stride_ml,
        HAS_MASK: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Keys and values `offs` (those < stop) of cell b, head h as (BK, BD) tiles in DOT, and the scores
        S = q kᵀ · scale (BQ, BK) in ACC, -inf on keys that are masked out or past stop."""
        keep = _kept_keys(MASK, b, offs, stop, stride_mb, stride_ml, HAS_MASK)
        k = _load_rows(K, b, h, offs, stop, head_dim, stride_kb, stride_kh, stride_kl, stride_kd, DOT, BLOCK_D)
        v = _load_rows(V, b, h, offs, stop, head_dim, stride_vb, stride_vh, stride_vl, stride_vd, DOT, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC) * scale
        return k, v, tl.where(keep[None, :], s, float("-inf"))

    @triton.jit
    def _tile_softmax(q, k, keep, scale, ACC: tl.constexpr, PRECISION: tl.constexpr):
        """Exact softmax over every key of a tile: (BQ, BD) queries × (BK, BD) keys -> (BQ, BK) probabilities;
        rows without a kept key are zeros."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC) * scale
        s = tl.where(keep[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(s - m[:, None])
        total = tl.sum(e, 1)
        return e / tl.where(total > 0, total, 1.0)[:, None]

    @triton.autotune(
        configs=_KEY_BLOCK_CONFIGS,
        key=["len_q", "head_dim"],  # not len_k: the padded gene count changes every batch
    )
    @triton.jit
    def _pool_fwd_kernel(
        Q, K, V, MASK, OUT, LSE,
        stride_qb, stride_ql, stride_qh, stride_qd,
        stride_kb, stride_kl, stride_kh, stride_kd,
        stride_vb, stride_vl, stride_vh, stride_vd,
        stride_mb, stride_ml,
        stride_ob, stride_os, stride_ol, stride_oh, stride_od,
        stride_lb, stride_ls, stride_lh, stride_ll,
        n_heads, len_q, len_k, head_dim, keys_per_split, scale,
        HAS_MASK: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per (cell · head, key split): online softmax over the split's key blocks.

        Writes the split's normalised output and log-sum-exp (-inf when no key of the split is kept); with a
        single split OUT and LSE are the final output and the LSE the backward reads.
        """
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = pid_bh % n_heads
        offs_q = tl.arange(0, BLOCK_Q)
        q = _load_rows(Q, b, h, offs_q, len_q, head_dim, stride_qb, stride_qh, stride_ql, stride_qd, DOT, BLOCK_D)
        m_i = tl.full([BLOCK_Q], float("-inf"), ACC)
        l_i = tl.zeros([BLOCK_Q], ACC)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], ACC)
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, len_k)
        for k0 in range(start, stop, BLOCK_K):
            _, v, s = _key_block_scores(
                q, K, V, MASK, b, h, k0 + tl.arange(0, BLOCK_K), stop, head_dim, scale,
                stride_kb, stride_kl, stride_kh, stride_kd, stride_vb, stride_vl, stride_vh, stride_vd,
                stride_mb, stride_ml, HAS_MASK, DOT, ACC, PRECISION, BLOCK_D,
            )  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no kept key yet: avoid -inf - -inf
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])  # (BQ, BK); 0 on dropped keys
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION).to(ACC)
            m_i = m_new
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        out_split = OUT + split * stride_os
        _store_rows(out_split, out, b, h, offs_q, len_q, head_dim, stride_ob, stride_oh, stride_ol, stride_od, BLOCK_D)
        tl.store(LSE + b * stride_lb + split * stride_ls + h * stride_lh + offs_q * stride_ll, lse, mask=offs_q < len_q)

    @triton.jit
    def _pool_combine_kernel(
        OP, LSEP, OUT, LSE,
        stride_pb, stride_ps, stride_pl, stride_ph, stride_pd,
        stride_qb, stride_qs, stride_qh, stride_ql,
        stride_ob, stride_ol, stride_oh, stride_od,
        stride_lb, stride_lh, stride_ll,
        n_heads, len_q, head_dim, n_splits,
        ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per cell · head: merge the splits' normalised outputs OP (B, splits, Lq, H, D) by their
        log-sum-exps LSEP (B, splits, H, Lq) into OUT and LSE: out = Σ_s exp(lse_s − lse) out_s."""
        pid_bh = tl.program_id(0)
        b = (pid_bh // n_heads).to(tl.int64)
        h = pid_bh % n_heads
        offs_q = tl.arange(0, BLOCK_Q)
        q_ok = offs_q < len_q
        lse_base = LSEP + b * stride_qb + h * stride_qh + offs_q * stride_ql
        m = tl.full([BLOCK_Q], float("-inf"), ACC)
        for s in range(n_splits):
            m = tl.maximum(m, tl.load(lse_base + s * stride_qs, mask=q_ok, other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros([BLOCK_Q], ACC)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], ACC)
        for s in range(n_splits):
            w = tl.exp(tl.load(lse_base + s * stride_qs, mask=q_ok, other=float("-inf")) - m_safe)  # (BQ,)
            total += w
            part = OP + s * stride_ps
            acc += w[:, None] * _load_rows(
                part, b, h, offs_q, len_q, head_dim, stride_pb, stride_ph, stride_pl, stride_pd, ACC, BLOCK_D
            )
        has_keys = total > 0
        out = acc / tl.where(has_keys, total, 1.0)[:, None]
        lse = tl.where(has_keys, m_safe + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
        _store_rows(OUT, out, b, h, offs_q, len_q, head_dim, stride_ob, stride_oh, stride_ol, stride_od, BLOCK_D)
        tl.store(LSE + b * stride_lb + h * stride_lh + offs_q * stride_ll, lse, mask=q_ok)

    @triton.jit
    def _pool_bwd_row_terms(
        OUT, DO, LSE, b, h, offs_q, len_q, head_dim,
        stride_ob, stride_ol, stride_oh, stride_od,
        stride_gb, stride_gl, stride_gh, stride_gd,
        stride_lb, stride_lh, stride_ll,
        DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """What the pooling backward needs per query row of (cell b, head h): dO in DOT, Δ = rowsum(dO ⊙ O), and
        the LSE with -inf (no kept key) turned into +inf so that P = exp(S − lse) = 0 there (and on padding)."""
        do = _load_rows(DO, b, h, offs_q, len_q, head_dim, stride_gb, stride_gh, stride_gl, stride_gd, ACC, BLOCK_D)
        out = _load_rows(OUT, b, h, offs_q, len_q, head_dim, stride_ob, stride_oh, stride_ol, stride_od, ACC, BLOCK_D)
        delta = tl.sum(out * do, 1)
        lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_q * stride_ll, mask=offs_q < len_q, other=float("inf"))
        return do.to(DOT), delta, tl.where(lse == float("-inf"), float("inf"), lse)

    @triton.autotune(
        configs=_KEY_BLOCK_CONFIGS,
        key=["len_q", "head_dim"],
    )
    @triton.jit
    def _pool_bwd_kernel(
        Q, K, V, MASK, OUT, DO, LSE, DQP, DK, DV,
        stride_qb, stride_ql, stride_qh, stride_qd,
        stride_kb, stride_kl, stride_kh, stride_kd,
        stride_vb, stride_vl, stride_vh, stride_vd,
        stride_mb, stride_ml,
        stride_ob, stride_ol, stride_oh, stride_od,
        stride_gb, stride_gl, stride_gh, stride_gd,
        stride_lb, stride_lh, stride_ll,
        stride_pb, stride_ps, stride_pl, stride_ph, stride_pd,
        stride_dkb, stride_dkl, stride_dkh, stride_dkd,
        stride_dvb, stride_dvl, stride_dvh, stride_dvd,
        n_heads, len_q, len_k, head_dim, keys_per_split, scale,
        HAS_MASK: tl.constexpr, WRITE_KV: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per (cell · head, key split). For each key block of the split, recompute
        P = exp(S − lse), write dV = Pᵀ dO and dK = scale · dSᵀ q (no other program touches those keys), and
        accumulate dQ = scale · Σ_blocks dS K in registers, stored once into DQP (B, splits, Lq, H, D);
        dS = P ⊙ (dO Vᵀ − Δ) with Δ = rowsum(dO ⊙ O) computed here from the Lq × D tiles.
        WRITE_KV=False computes dQ only (folded pooling reduces dK + dV over the heads in its own kernel)."""
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = pid_bh % n_heads
        offs_q = tl.arange(0, BLOCK_Q)
        q = _load_rows(Q, b, h, offs_q, len_q, head_dim, stride_qb, stride_qh, stride_ql, stride_qd, DOT, BLOCK_D)
        do, delta, lse = _pool_bwd_row_terms(
            OUT, DO, LSE, b, h, offs_q, len_q, head_dim, stride_ob, stride_ol, stride_oh, stride_od,
            stride_gb, stride_gl, stride_gh, stride_gd, stride_lb, stride_lh, stride_ll, DOT, ACC, BLOCK_D,
        )  # fmt: skip
        dq = tl.zeros([BLOCK_Q, BLOCK_D], ACC)
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, len_k)
        for k0 in range(start, stop, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            k, v, s = _key_block_scores(
                q, K, V, MASK, b, h, offs, stop, head_dim, scale,
                stride_kb, stride_kl, stride_kh, stride_kd, stride_vb, stride_vl, stride_vh, stride_vd,
                stride_mb, stride_ml, HAS_MASK, DOT, ACC, PRECISION, BLOCK_D,
            )  # fmt: skip
            p = tl.exp(s - lse[:, None])  # (BQ, BK); 0 on dropped keys, padded rows and cells without keys
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(ACC)  # (BQ, BK)
            ds = (p * (dp - delta[:, None])).to(DOT)
            dq += tl.dot(ds, k, input_precision=PRECISION).to(ACC)
            if WRITE_KV:
                dv = tl.dot(tl.trans(p.to(DOT)), do, input_precision=PRECISION)  # (BK, BD)
                dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION).to(ACC) * scale  # (BK, BD)
                _store_rows(DK, dk, b, h, offs, stop, head_dim, stride_dkb, stride_dkh, stride_dkl, stride_dkd, BLOCK_D)
                _store_rows(DV, dv, b, h, offs, stop, head_dim, stride_dvb, stride_dvh, stride_dvl, stride_dvd, BLOCK_D)
        dq_split = DQP + split * stride_ps
        _store_rows(
            dq_split, dq * scale, b, h, offs_q, len_q, head_dim, stride_pb, stride_ph, stride_pl, stride_pd, BLOCK_D
        )

    @triton.autotune(
        configs=_TOKEN_BLOCK_CONFIGS,
        key=["len_q", "dim", "n_heads"],
    )
    @triton.jit
    def _folded_pool_bwd_dx_kernel(
        Q, X, MASK, OUT, DO, LSE, DX,
        stride_qb, stride_ql, stride_qh, stride_qd,
        stride_xb, stride_xl, stride_xd,
        stride_mb, stride_ml,
        stride_ob, stride_ol, stride_oh, stride_od,
        stride_gb, stride_gl, stride_gh, stride_gd,
        stride_lb, stride_lh, stride_ll,
        stride_db, stride_dl, stride_dd,
        n_heads, len_q, len_k, dim, scale,
        HAS_MASK: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per (token block, cell) of folded pooling, where the tokens X (B, Lk, E) are every
        head's keys and values: dX = Σ_h P_hᵀ dO_h + scale · dS_hᵀ q_h, summed over heads in registers, so
        no per-head (B, Lk, H, E) gradient is ever formed. Q, OUT, DO: (·, Lq, H, E); LSE (B, H, Lq)."""
        offs = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        b = tl.program_id(1).to(tl.int64)
        offs_q = tl.arange(0, BLOCK_Q)
        keep = _kept_keys(MASK, b, offs, len_k, stride_mb, stride_ml, HAS_MASK)
        x = _load_rows(X, b, 0, offs, len_k, dim, stride_xb, 0, stride_xl, stride_xd, DOT, BLOCK_D)  # (BK, BD)
        dx = tl.zeros([BLOCK_K, BLOCK_D], ACC)
        for h in range(n_heads):
            q = _load_rows(Q, b, h, offs_q, len_q, dim, stride_qb, stride_qh, stride_ql, stride_qd, DOT, BLOCK_D)
            do, delta, lse = _pool_bwd_row_terms(
                OUT, DO, LSE, b, h, offs_q, len_q, dim, stride_ob, stride_ol, stride_oh, stride_od,
                stride_gb, stride_gl, stride_gh, stride_gd, stride_lb, stride_lh, stride_ll, DOT, ACC, BLOCK_D,
            )  # fmt: skip
            s = tl.dot(q, tl.trans(x), input_precision=PRECISION).to(ACC) * scale  # (BQ, BK)
            p = tl.where(keep[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(x), input_precision=PRECISION).to(ACC)  # (BQ, BK)
            ds = (p * (dp - delta[:, None])).to(DOT)
            dx += tl.dot(tl.trans(p.to(DOT)), do, input_precision=PRECISION).to(ACC)
            dx += tl.dot(tl.trans(ds), q, input_precision=PRECISION).to(ACC) * scale
        _store_rows(DX, dx, b, 0, offs, len_k, dim, stride_db, 0, stride_dl, stride_dd, BLOCK_D)

    @triton.autotune(
        configs=_QUERY_BLOCK_CONFIGS,
        key=["len_k", "head_dim"],  # not len_q: the number of decoded genes may change between calls
    )
    @triton.jit
    def _unpool_fwd_kernel(
        Q, K, V, MASK, OUT,
        stride_qb, stride_ql, stride_qh, stride_qd,
        stride_kb, stride_kl, stride_kh, stride_kd,
        stride_vb, stride_vl, stride_vh, stride_vd,
        stride_mb, stride_ml,
        stride_ob, stride_ol, stride_oh, stride_od,
        n_heads, len_q, len_k, head_dim, scale,
        HAS_MASK: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per (query block, cell · head): the block's queries against all keys of the cell."""
        offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = pid_bh % n_heads
        offs_k = tl.arange(0, BLOCK_K)
        q = _load_rows(Q, b, h, offs_q, len_q, head_dim, stride_qb, stride_qh, stride_ql, stride_qd, DOT, BLOCK_D)
        k = _load_rows(K, b, h, offs_k, len_k, head_dim, stride_kb, stride_kh, stride_kl, stride_kd, DOT, BLOCK_D)
        v = _load_rows(V, b, h, offs_k, len_k, head_dim, stride_vb, stride_vh, stride_vl, stride_vd, DOT, BLOCK_D)
        keep = _kept_keys(MASK, b, offs_k, len_k, stride_mb, stride_ml, HAS_MASK)
        p = _tile_softmax(q, k, keep, scale, ACC, PRECISION)  # (BQ, BK)
        out = tl.dot(p.to(DOT), v, input_precision=PRECISION)  # (BQ, BD)
        _store_rows(OUT, out, b, h, offs_q, len_q, head_dim, stride_ob, stride_oh, stride_ol, stride_od, BLOCK_D)

    @triton.jit
    def _unpool_bwd_tile(q, k, v, keep, do, scale, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
        """(P, dS) of a query tile against all keys of a cell. With every key in the tile,
        Δ = rowsum(dO ⊙ O) = rowsum(P ⊙ dP) exactly, so O is never read (nor its rounding to bf16)."""
        p = _tile_softmax(q, k, keep, scale, ACC, PRECISION)  # (BQ, BK)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(ACC)  # (BQ, BK)
        return p, (p * (dp - tl.sum(p * dp, 1)[:, None])).to(DOT)

    @triton.autotune(
        configs=_QUERY_BLOCK_CONFIGS,
        key=["len_k", "head_dim"],
    )
    @triton.jit
    def _unpool_bwd_kv_kernel(
        Q, K, V, MASK, DO, DKP, DVP,
        stride_qb, stride_ql, stride_qh, stride_qd,
        stride_kb, stride_kl, stride_kh, stride_kd,
        stride_vb, stride_vl, stride_vh, stride_vd,
        stride_mb, stride_ml,
        stride_gb, stride_gl, stride_gh, stride_gd,
        stride_ps, stride_pb, stride_pl, stride_ph, stride_pd,
        n_heads, len_q, len_k, head_dim, queries_per_split, scale,
        HAS_MASK: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per (cell · head, query split): dV = Σ Pᵀ dO and dK = scale · Σ dSᵀ q over the split's
        query blocks, accumulated in registers and stored into DKP/DVP (splits, B, Lk, H, D)."""
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = pid_bh % n_heads
        offs_k = tl.arange(0, BLOCK_K)
        k = _load_rows(K, b, h, offs_k, len_k, head_dim, stride_kb, stride_kh, stride_kl, stride_kd, DOT, BLOCK_D)
        v = _load_rows(V, b, h, offs_k, len_k, head_dim, stride_vb, stride_vh, stride_vl, stride_vd, DOT, BLOCK_D)
        keep = _kept_keys(MASK, b, offs_k, len_k, stride_mb, stride_ml, HAS_MASK)
        dk = tl.zeros([BLOCK_K, BLOCK_D], ACC)
        dv = tl.zeros([BLOCK_K, BLOCK_D], ACC)
        start = split * queries_per_split
        stop = tl.minimum(start + queries_per_split, len_q)
        for q0 in range(start, stop, BLOCK_Q):
            offs = q0 + tl.arange(0, BLOCK_Q)
            q = _load_rows(Q, b, h, offs, stop, head_dim, stride_qb, stride_qh, stride_ql, stride_qd, DOT, BLOCK_D)
            do = _load_rows(DO, b, h, offs, stop, head_dim, stride_gb, stride_gh, stride_gl, stride_gd, DOT, BLOCK_D)
            p, ds = _unpool_bwd_tile(q, k, v, keep, do, scale, DOT, ACC, PRECISION)
            dv += tl.dot(tl.trans(p.to(DOT)), do, input_precision=PRECISION).to(ACC)
            dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION).to(ACC)
        dk_split, dv_split = DKP + split * stride_ps, DVP + split * stride_ps
        _store_rows(
            dk_split, dk * scale, b, h, offs_k, len_k, head_dim, stride_pb, stride_ph, stride_pl, stride_pd, BLOCK_D
        )
        _store_rows(dv_split, dv, b, h, offs_k, len_k, head_dim, stride_pb, stride_ph, stride_pl, stride_pd, BLOCK_D)

    @triton.autotune(
        configs=_QUERY_BLOCK_CONFIGS,
        key=["len_k", "head_dim"],
    )
    @triton.jit
    def _unpool_bwd_q_kernel(
        Q, K, V, MASK, DO, DQ,
        stride_qb, stride_ql, stride_qh, stride_qd,
        stride_kb, stride_kl, stride_kh, stride_kd,
        stride_vb, stride_vl, stride_vh, stride_vd,
        stride_mb, stride_ml,
        stride_gb, stride_gl, stride_gh, stride_gd,
        stride_dqb, stride_dql, stride_dqh, stride_dqd,
        n_heads, len_q, len_k, head_dim, cells_per_query, scale,
        HAS_MASK: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per (query block, query batch · head): dQ = scale · Σ_cells dS K over the cells that
        share the query (all B of them when Bq = 1), summed in registers and written once into DQ."""
        offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        pid_bh = tl.program_id(1)
        qb = (pid_bh // n_heads).to(tl.int64)
        h = pid_bh % n_heads
        offs_k = tl.arange(0, BLOCK_K)
        q = _load_rows(Q, qb, h, offs_q, len_q, head_dim, stride_qb, stride_qh, stride_ql, stride_qd, DOT, BLOCK_D)
        dq = tl.zeros([BLOCK_Q, BLOCK_D], ACC)
        for c in range(cells_per_query):
            b = qb * cells_per_query + c
            k = _load_rows(K, b, h, offs_k, len_k, head_dim, stride_kb, stride_kh, stride_kl, stride_kd, DOT, BLOCK_D)
            v = _load_rows(V, b, h, offs_k, len_k, head_dim, stride_vb, stride_vh, stride_vl, stride_vd, DOT, BLOCK_D)
            keep = _kept_keys(MASK, b, offs_k, len_k, stride_mb, stride_ml, HAS_MASK)
            do = _load_rows(DO, b, h, offs_q, len_q, head_dim, stride_gb, stride_gh, stride_gl, stride_gd, DOT, BLOCK_D)
            _, ds = _unpool_bwd_tile(q, k, v, keep, do, scale, DOT, ACC, PRECISION)
            dq += tl.dot(ds, k, input_precision=PRECISION).to(ACC)
        _store_rows(
            DQ, dq * scale, qb, h, offs_q, len_q, head_dim, stride_dqb, stride_dqh, stride_dql, stride_dqd, BLOCK_D
        )


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

# Every buffer a kernel writes is allocated through this name; the tests replace it with a NaN-filled
# allocator so an element a kernel forgot to write cannot pass.
_empty = torch.empty

# Splits of the long axis start on multiples of the largest autotuned block, so no block straddles two.
_SPLIT_GRANULE = 16 if INTERPRETING else 128


def _dtypes(dtype: torch.dtype) -> tuple[Any, Any, str]:
    """(DOT, ACC, PRECISION) for inputs of `dtype`. 16-bit operands stay 16-bit for tl.dot on a GPU; the
    interpreter gets fp32 (it computes raw bf16 wrongly)."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.float32 or INTERPRETING:
        return tl.float32, tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), tl.float32, "tf32"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(n: int) -> int:
    """A tile side holding n rows: a power of two, at least 16 (tl.dot's minimum on GPUs)."""
    return max(16, triton.next_power_of_2(n))


def _query_strides(q: torch.Tensor) -> tuple[int, ...]:
    """Strides of q (Bq, Lq, H, D); a batch-1 query is read by every cell with batch stride 0."""
    stride = q.stride()
    return (0 if q.shape[0] == 1 else stride[0], *stride[1:])


def _mask_args(key_mask: torch.Tensor | None, k: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], bool]:
    """(pointer, strides, HAS_MASK); the bool mask is read in place as uint8."""
    if key_mask is None:
        return k, (0, 0), False
    as_bytes = key_mask.view(torch.uint8)
    return as_bytes, as_bytes.stride(), True


def _split(length: int, requested: int | None, n_programs: int, device: torch.device) -> tuple[int, int]:
    """(items per split, a multiple of _SPLIT_GRANULE; number of splits) of a long axis of `length` items.

    Default: enough splits for ~2 waves of the GPU's SMs given n_programs (cell, head) pairs; one off CUDA.
    """
    n_granules = triton.cdiv(length, _SPLIT_GRANULE)
    if requested is None:
        n_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        requested = triton.cdiv(2 * n_sms, n_programs)
    splits = max(1, min(requested, n_granules))
    per_split = triton.cdiv(n_granules, splits) * _SPLIT_GRANULE
    return per_split, triton.cdiv(length, per_split)


def _pooling_forward(q, k, v, key_mask, scale, num_splits):
    bsz, len_k, n_heads, head_dim = k.shape
    len_q = q.shape[1]
    dot, acc, precision = _dtypes(q.dtype)
    acc_dtype = _acc_dtype(q.dtype)
    block_q, block_d = _block(len_q), _block(head_dim)
    keys_per_split, splits = _split(len_k, num_splits, bsz * n_heads, q.device)
    out = _empty((bsz, len_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = _empty((bsz, n_heads, len_q), dtype=acc_dtype, device=q.device)
    if splits == 1:  # the kernel writes the final output and LSE
        out_split, lse_split = out.unsqueeze(1), lse.unsqueeze(1)  # (B, 1, Lq, H, D), (B, 1, H, Lq)
    else:
        out_split = _empty((bsz, splits, len_q, n_heads, head_dim), dtype=acc_dtype, device=q.device)
        lse_split = _empty((bsz, splits, n_heads, len_q), dtype=acc_dtype, device=q.device)
    mask, mask_strides, has_mask = _mask_args(key_mask, k)
    _pool_fwd_kernel[(bsz * n_heads, splits)](
        q, k, v, mask, out_split, lse_split,
        *_query_strides(q), *k.stride(), *v.stride(), *mask_strides, *out_split.stride(), *lse_split.stride(),
        n_heads, len_q, len_k, head_dim, keys_per_split, scale,
        HAS_MASK=has_mask, DOT=dot, ACC=acc, PRECISION=precision, BLOCK_Q=block_q, BLOCK_D=block_d,
    )  # fmt: skip
    if splits > 1:
        _pool_combine_kernel[(bsz * n_heads,)](
            out_split, lse_split, out, lse,
            *out_split.stride(), *lse_split.stride(), *out.stride(), *lse.stride(),
            n_heads, len_q, head_dim, splits,
            ACC=acc, BLOCK_Q=block_q, BLOCK_D=block_d,
        )  # fmt: skip
    return out, lse


def _pooling_backward(q, k, v, key_mask, out, lse, dout, scale, num_splits, write_kv=True):
    """(dq, dk, dv); dk and dv are None when write_kv is False (the kernel then computes dq only)."""
    bsz, len_k, n_heads, head_dim = k.shape
    len_q = q.shape[1]
    dot, acc, precision = _dtypes(q.dtype)
    acc_dtype = _acc_dtype(q.dtype)
    keys_per_split, splits = _split(len_k, num_splits, bsz * n_heads, q.device)
    dq_split = _empty((bsz, splits, len_q, n_heads, head_dim), dtype=acc_dtype, device=q.device)
    dk = _empty(k.shape, dtype=k.dtype, device=k.device) if write_kv else None
    dv = _empty(v.shape, dtype=v.dtype, device=v.device) if write_kv else None
    dk_args = (dk, dv, *dk.stride(), *dv.stride()) if write_kv else (q, q, *(0,) * 8)
    mask, mask_strides, has_mask = _mask_args(key_mask, k)
    _pool_bwd_kernel[(bsz * n_heads, splits)](
        q, k, v, mask, out, dout, lse, dq_split, *dk_args[:2],
        *_query_strides(q), *k.stride(), *v.stride(), *mask_strides, *out.stride(), *dout.stride(),
        *lse.stride(), *dq_split.stride(), *dk_args[2:],
        n_heads, len_q, len_k, head_dim, keys_per_split, scale,
        HAS_MASK=has_mask, WRITE_KV=write_kv, DOT=dot, ACC=acc, PRECISION=precision,
        BLOCK_Q=_block(len_q), BLOCK_D=_block(head_dim),
    )  # fmt: skip
    # (B, splits, Lq, H, D) -> (Bq, Lq, H, D): shared queries sum over cells too.
    dq = dq_split.sum(dim=(0, 1)).unsqueeze(0) if q.shape[0] == 1 else dq_split.sum(dim=1)
    return dq.to(q.dtype), dk, dv


def _unpooling_forward(q, k, v, key_mask, scale):
    bsz, len_k, n_heads, head_dim = k.shape
    len_q = q.shape[1]
    dot, acc, precision = _dtypes(q.dtype)
    out = _empty((bsz, len_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    mask, mask_strides, has_mask = _mask_args(key_mask, k)
    _unpool_fwd_kernel[lambda meta: (triton.cdiv(len_q, meta["BLOCK_Q"]), bsz * n_heads)](
        q, k, v, mask, out,
        *_query_strides(q), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        n_heads, len_q, len_k, head_dim, scale,
        HAS_MASK=has_mask, DOT=dot, ACC=acc, PRECISION=precision, BLOCK_K=_block(len_k), BLOCK_D=_block(head_dim),
    )  # fmt: skip
    return out


def _unpooling_backward(q, k, v, key_mask, dout, scale, num_splits):
    bsz, len_k, n_heads, head_dim = k.shape
    len_q = q.shape[1]
    dot, acc, precision = _dtypes(q.dtype)
    acc_dtype = _acc_dtype(q.dtype)
    queries_per_split, splits = _split(len_q, num_splits, bsz * n_heads, q.device)
    if splits == 1:  # the kernel writes dK and dV themselves
        dk = _empty(k.shape, dtype=k.dtype, device=k.device)
        dv = _empty(v.shape, dtype=v.dtype, device=v.device)
        dk_split, dv_split = dk.unsqueeze(0), dv.unsqueeze(0)  # (1, B, Lk, H, D)
    else:
        dk_split = _empty((splits, *k.shape), dtype=acc_dtype, device=k.device)
        dv_split = _empty((splits, *v.shape), dtype=acc_dtype, device=v.device)
    mask, mask_strides, has_mask = _mask_args(key_mask, k)
    constexprs = dict(HAS_MASK=has_mask, DOT=dot, ACC=acc, PRECISION=precision)
    constexprs.update(BLOCK_K=_block(len_k), BLOCK_D=_block(head_dim))
    _unpool_bwd_kv_kernel[(bsz * n_heads, splits)](
        q, k, v, mask, dout, dk_split, dv_split,
        *_query_strides(q), *k.stride(), *v.stride(), *mask_strides, *dout.stride(), *dk_split.stride(),
        n_heads, len_q, len_k, head_dim, queries_per_split, scale, **constexprs,
    )  # fmt: skip
    if splits > 1:
        dk, dv = dk_split.sum(0).to(k.dtype), dv_split.sum(0).to(v.dtype)  # (B, Lk, H, D)
    dq = _empty(q.shape, dtype=q.dtype, device=q.device)
    _unpool_bwd_q_kernel[lambda meta: (triton.cdiv(len_q, meta["BLOCK_Q"]), q.shape[0] * n_heads)](
        q, k, v, mask, dout, dq,
        *_query_strides(q), *k.stride(), *v.stride(), *mask_strides, *dout.stride(), *dq.stride(),
        n_heads, len_q, len_k, head_dim, bsz // q.shape[0], scale, **constexprs,
    )  # fmt: skip
    return dq, dk, dv


class _PoolingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale, num_splits):
        out, lse = _pooling_forward(q, k, v, key_mask, scale, num_splits)
        ctx.save_for_backward(q, k, v, key_mask, out, lse)
        ctx.scale, ctx.num_splits = scale, num_splits
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, key_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = _pooling_backward(q, k, v, key_mask, out, lse, dout, ctx.scale, ctx.num_splits)
        return dq, dk, dv, None, None, None


class _UnpoolingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale, num_splits):
        out = _unpooling_forward(q, k, v, key_mask, scale)
        ctx.save_for_backward(q, k, v, key_mask)  # the backward never reads the output
        ctx.scale, ctx.num_splits = scale, num_splits
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, key_mask = ctx.saved_tensors
        dq, dk, dv = _unpooling_backward(q, k, v, key_mask, dout, ctx.scale, ctx.num_splits)
        return dq, dk, dv, None, None, None


def _tokens_as_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Lk, E) tokens -> (B, Lk, H, E): the same tokens for every head, a view with head stride 0."""
    return x.unsqueeze(2).expand(-1, -1, n_heads, -1)


def _folded_pooling_dx(q, x, key_mask, out, lse, dout, scale):
    bsz, len_k, dim = x.shape
    len_q, n_heads = q.shape[1], q.shape[2]
    dot, acc, precision = _dtypes(q.dtype)
    dx = _empty(x.shape, dtype=x.dtype, device=x.device)
    mask, mask_strides, has_mask = _mask_args(key_mask, x)
    _folded_pool_bwd_dx_kernel[lambda meta: (triton.cdiv(len_k, meta["BLOCK_K"]), bsz)](
        q, x, mask, out, dout, lse, dx,
        *_query_strides(q), *x.stride(), *mask_strides, *out.stride(), *dout.stride(), *lse.stride(), *dx.stride(),
        n_heads, len_q, len_k, dim, scale,
        HAS_MASK=has_mask, DOT=dot, ACC=acc, PRECISION=precision, BLOCK_Q=_block(len_q), BLOCK_D=_block(dim),
    )  # fmt: skip
    return dx


class _FoldedPoolingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, x, key_mask, scale, num_splits):
        tokens = _tokens_as_heads(x, q.shape[2])  # (B, Lk, H, E)
        out, lse = _pooling_forward(q, tokens, tokens, key_mask, scale, num_splits)
        ctx.save_for_backward(q, x, key_mask, out, lse)
        ctx.scale, ctx.num_splits = scale, num_splits
        return out

    @staticmethod
    def backward(ctx, dout):
        q, x, key_mask, out, lse = ctx.saved_tensors
        tokens = _tokens_as_heads(x, q.shape[2])
        dq, _, _ = _pooling_backward(q, tokens, tokens, key_mask, out, lse, dout, ctx.scale, ctx.num_splits, False)
        dx = _folded_pooling_dx(q, x, key_mask, out, lse, dout, ctx.scale)
        return dq, dx, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------------------


def _check_inputs(
    name: str, q, k, v, key_mask, *, max_queries: int = 2**31, max_keys: int = 2**31, max_head_dim: int = _MAX_HEAD_DIM
) -> None:
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"{name}: expected q (Bq, Lq, H, D) and k, v (B, Lk, H, D) of one shape; got {shapes}")
    bsz, len_k, n_heads, head_dim = k.shape
    if q.shape[0] not in (1, bsz) or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"{name}: q must be (1 or B={bsz}, Lq, H={n_heads}, D={head_dim}); got {shapes}")
    if min(bsz, len_k, q.shape[1], n_heads, head_dim) == 0:
        raise ValueError(f"{name}: empty input ({shapes})")
    if head_dim > max_head_dim:
        raise ValueError(f"{name}: head dim {head_dim} > {max_head_dim} does not fit one register tile")
    for what, length, limit in (("queries", q.shape[1], max_queries), ("keys", len_k, max_keys)):
        if length > limit:
            raise ValueError(
                f"{name} holds all {what} of a cell in one tile: {length} > {limit}; use pooling_attention for "
                "few queries over many keys, unpooling_attention for many queries over few keys, or the torch backend"
            )
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: q, k, v must share one of {_FLOAT_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"{name}: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    if key_mask is not None:
        if key_mask.dtype != torch.bool or key_mask.shape != (bsz, len_k) or key_mask.device != k.device:
            raise ValueError(
                f"{name}: key_mask must be a bool (B={bsz}, Lk={len_k}) tensor on {k.device} (True = attend); "
                f"got {key_mask.dtype} {tuple(key_mask.shape)} on {key_mask.device}"
            )


def _dispatch(name: str, function, inputs: tuple, reference_qkv: tuple, key_mask, scale, num_splits) -> torch.Tensor:
    """function.apply(*inputs, ...) (the Triton autograd Function), or, with one warning when Triton cannot run
    on these tensors, the reference on reference_qkv. scale defaults to the query width^-1/2."""
    scale = inputs[0].shape[-1] ** -0.5 if scale is None else float(scale)
    reason = kernel_unavailable_reason(*inputs)
    if reason is None and inputs[0].dtype == torch.float64 and inputs[0].is_cuda:
        reason = "float64 runs under the interpreter only (Triton's fp64 tl.dot does not compile for these tiles)"
    if reason is not None:
        warn_fallback_once(name, reason)
        return attention_reference(*reference_qkv, key_mask, scale)
    return function.apply(*inputs, key_mask, scale, num_splits)


def pooling_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Few queries (Lq ≤ 128) over many keys: (Bq, Lq, H, D), (B, Lk, H, D) ×2, (B, Lk) -> (B, Lq, H, D).

    scale defaults to D^-1/2. num_splits (programs per (cell, head) along the keys) defaults to enough for
    two waves of the GPU; the tests set it to exercise the combine step.
    """
    _check_inputs("pooling_attention", q, k, v, key_mask, max_queries=_MAX_POOLING_QUERIES)
    return _dispatch("pooling_attention", _PoolingAttention, (q, k, v), (q, k, v), key_mask, scale, num_splits)


def unpooling_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Many queries over few keys (Lk ≤ 256): (Bq, Lq, H, D), (B, Lk, H, D) ×2, (B, Lk) -> (B, Lq, H, D).

    A batch-1 q (the gene queries every cell shares) is never expanded, and its gradient is summed over
    cells inside the dQ kernel. num_splits splits the queries of the dK/dV kernel, as in pooling_attention.
    """
    _check_inputs("unpooling_attention", q, k, v, key_mask, max_keys=_MAX_UNPOOLING_KEYS)
    return _dispatch("unpooling_attention", _UnpoolingAttention, (q, k, v), (q, k, v), key_mask, scale, num_splits)


def folded_pooling_attention(
    q: torch.Tensor,
    x: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Pooling whose keys and values are the tokens themselves, shared by every head:
    q (Bq, Lq, H, E), x (B, Lk, E), key_mask (B, Lk) -> out (B, Lq, H, E), out[:, :, h] = softmax(q_h xᵀ · scale) x.

    The building block of pooling with the K/V projections folded away (MCAB kernel="pooling_folded"):
    with q_h = W_k,hᵀ (W_q,h q) and the value projection applied to the result, it equals ordinary pooling,
    but K and V are never formed for the B·Lk tokens; the backward sums the heads' dK + dV into one dX in
    registers. scale is required in practice: the heads' width Dh, not E, sets it (default E^-1/2).
    """
    if x.dim() != 3 or q.dim() != 4 or q.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"folded_pooling_attention: expected q (Bq, Lq, H, E) and x (B, Lk, E); got q {tuple(q.shape)}, "
            f"x {tuple(x.shape)}"
        )
    tokens = _tokens_as_heads(x, q.shape[2])
    name = "folded_pooling_attention"
    _check_inputs(name, q, tokens, tokens, key_mask, max_queries=_MAX_POOLING_QUERIES, max_head_dim=_MAX_FOLDED_DIM)
    return _dispatch(name, _FoldedPoolingAttention, (q, x), (q, tokens, tokens), key_mask, scale, num_splits)
