"""model.pooling_weights=count|log1p: the encoder's pooling weighs each gene token by its count (or log1p(count))
on top of its attention score."""

import pytest
import torch

from scldm_scale.config import ConfigError, load_config
from scldm_scale.models.mcab import Attention
from scldm_scale.models.vae import SetVAE
from scldm_scale.quickstart import QUICKSTART_CONFIG


def test_flat_scores_pool_the_log_count_weighted_mean_of_the_values():
    torch.manual_seed(0)
    attn = Attention(d_model=8, n_heads=2)
    torch.nn.init.zeros_(attn.w_q.weight)  # every score 0: the weights are the key bias alone
    keys = torch.randn(2, 5, 8)
    counts = torch.tensor([[1.0, 3.0, 40.0, 0.0, 0.0], [2.0, 2.0, 7.0, 1.0, 5.0]])
    mask = counts > 0
    out = attn(torch.randn(1, 3, 8), keys, key_mask=mask, key_bias=torch.log(torch.log1p(counts)))
    values = attn.w_kv(keys).chunk(2, dim=-1)[1]  # (B, K, D)
    weights = torch.log1p(counts) / torch.log1p(counts).sum(1, keepdim=True)  # (B, K), padding 0
    expected = attn.w_out((weights[..., None] * values).sum(1))  # (B, D), the same for every query
    torch.testing.assert_close(out, expected[:, None].expand(-1, 3, -1), rtol=1e-5, atol=1e-6)


def _vae(weights: str) -> SetVAE:
    cfg = load_config(QUICKSTART_CONFIG, [f"model.pooling_weights={weights}"])
    torch.manual_seed(0)
    return SetVAE(cfg.model, n_genes=20)


@pytest.mark.parametrize("weights", ["log1p", "count"])
def test_weighted_pooling_sees_the_counts_uniform_pooling_of_scale_tokens_barely_does(weights):
    ids = torch.arange(6)[None].expand(2, -1)
    counts = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 50.0, 50.0, 50.0]])
    mask = torch.ones(2, 6, dtype=torch.bool)
    shifts = {}
    for mode in ("uniform", weights):
        vae = _vae(mode)
        with torch.no_grad():
            z, _ = vae.encode(ids, counts, mask)
            padded, _ = vae.encode(
                torch.cat([ids, ids[:, :2]], 1),
                torch.cat([counts, torch.zeros(2, 2)], 1),
                torch.cat([mask, ~mask[:, :2]], 1),
            )
        torch.testing.assert_close(padded, z, rtol=1e-5, atol=1e-5)  # padding still changes nothing
        shifts[mode] = (z[0] - z[1]).abs().max().item()
    # The same genes at other counts: the pooling key LayerNorm makes E[g]·log1p(x) nearly count-free.
    assert shifts[weights] > 10 * shifts["uniform"]


def test_log1p_pooling_needs_the_torch_attention_backend():
    with pytest.raises(ConfigError, match="pooling_weights"):
        load_config(QUICKSTART_CONFIG, ["model.pooling_weights=log1p", "model.attention_backend=triton"])
