"""Attention, SwiGLU and MCAB against torch.nn.MultiheadAttention and hand-written formulas (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scldm_scale.models.mcab import MCAB, Attention, SelfAttentionBlock, SwiGLU


def _reference_mha(attn: Attention, d_model: int) -> nn.MultiheadAttention:
    """torch's own multi-head attention carrying the same (bias-free) weights."""
    mha = nn.MultiheadAttention(d_model, attn.n_heads, bias=False, batch_first=True, dtype=torch.float64)
    w_k, w_v = attn.w_kv.weight.chunk(2, dim=0)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.w_q.weight, w_k, w_v]))
        mha.out_proj.weight.copy_(attn.w_out.weight)
    return mha


@pytest.mark.parametrize(("d_model", "n_heads"), [(12, 1), (12, 3), (20, 4)])
def test_attention_matches_torch_multihead_attention_with_key_padding(d_model, n_heads):
    torch.manual_seed(0)
    attn = Attention(d_model, n_heads).double()
    mha = _reference_mha(attn, d_model)
    b, q_len, k_len = 3, 5, 7
    x_q = torch.randn(b, q_len, d_model, dtype=torch.float64)
    x_kv = torch.randn(b, k_len, d_model, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1])
    mask = torch.arange(k_len)[None] < lengths[:, None]  # (B, K), True on real keys
    ours = attn(x_q, x_kv, mask)
    ref, _ = mha(x_q, x_kv, x_kv, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ref_unmasked, _ = mha(x_q, x_kv, x_kv, need_weights=False)
    torch.testing.assert_close(attn(x_q, x_kv), ref_unmasked, rtol=1e-10, atol=1e-12)


def test_attention_broadcasts_queries_of_batch_one():
    torch.manual_seed(1)
    attn = Attention(8, 2).double()
    queries = torch.randn(1, 4, 8, dtype=torch.float64)
    keys = torch.randn(3, 6, 8, dtype=torch.float64)
    out = attn(queries, keys)
    assert out.shape == (3, 4, 8)
    torch.testing.assert_close(out, attn(queries.expand(3, -1, -1), keys), rtol=0, atol=1e-14)


@pytest.mark.parametrize(("d_model", "mlp_ratio", "hidden"), [(16, 8 / 3, 48), (32, 2.0, 64), (10, 1.0, 16)])
def test_swiglu_width_and_formula(d_model, mlp_ratio, hidden):
    torch.manual_seed(2)
    mlp = SwiGLU(d_model, mlp_ratio).double()
    assert mlp.w_gate.out_features == mlp.w_up.out_features == hidden
    assert mlp.w_gate.bias is None and mlp.w_up.bias is None and mlp.w_down.bias is None
    x = torch.randn(4, d_model, dtype=torch.float64)
    gate = x @ mlp.w_gate.weight.T
    expected = (gate * torch.sigmoid(gate) * (x @ mlp.w_up.weight.T)) @ mlp.w_down.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-14)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight


def test_mcab_is_residual_attention_onto_raw_queries_then_residual_mlp():
    torch.manual_seed(3)
    d = 12
    block = MCAB(d, 3, 2.0).double()
    with torch.no_grad():  # non-trivial LayerNorm gains, so swapping the norms would show
        for norm in (block.norm_q, block.norm_kv, block.norm_mlp):
            norm.weight.uniform_(0.5, 1.5)
    mha = _reference_mha(block.attn, d)
    queries = torch.randn(2, 4, d, dtype=torch.float64)
    keys = torch.randn(2, 9, d, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    attended, _ = mha(
        _layer_norm(queries, block.norm_q.weight),
        _layer_norm(keys, block.norm_kv.weight),
        _layer_norm(keys, block.norm_kv.weight),
        key_padding_mask=~mask,
        need_weights=False,
    )
    x = queries + attended
    h = _layer_norm(x, block.norm_mlp.weight)
    mlp = (F.silu(h @ block.mlp.w_gate.weight.T) * (h @ block.mlp.w_up.weight.T)) @ block.mlp.w_down.weight.T
    torch.testing.assert_close(block(queries, keys, mask), x + mlp, rtol=1e-10, atol=1e-12)


def test_mcab_output_ignores_masked_keys_whatever_their_values():
    torch.manual_seed(4)
    block = MCAB(8, 2, 2.0)
    queries = torch.randn(1, 3, 8)
    keys = torch.randn(1, 5, 8)
    padded = torch.cat([keys, 100 * torch.randn(1, 4, 8)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 4])
    alone = block(queries, keys)
    torch.testing.assert_close(block(queries, padded, mask), alone, rtol=0, atol=1e-6)
    assert (block(queries, padded) - alone).abs().max() > 1e-2  # the mask is what makes them equal


def test_self_attention_block_is_permutation_equivariant():
    torch.manual_seed(5)
    block = SelfAttentionBlock(8, 2, 2.0).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    perm = torch.randperm(6)
    torch.testing.assert_close(block(x[:, perm]), block(x)[:, perm], rtol=1e-12, atol=1e-12)


def test_blocks_have_no_biases():
    for module in (MCAB(8, 2, 2.0), SelfAttentionBlock(8, 2, 2.0)):
        names = [name for name, _ in module.named_parameters()]
        assert not any(name.endswith("bias") for name in names), names
