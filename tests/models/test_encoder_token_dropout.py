"""model.encoder_token_dropout: training passes hide expressed-gene tokens from the encoder; the decoder target and
every other pass keep all of them."""

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scldm_test_helpers import synthetic_vae_args

from scldm_scale import artifact
from scldm_scale.config import ConfigError, VAEConfig, load_config
from scldm_scale.data.batch import collate
from scldm_scale.models.vae import SetVAE
from scldm_scale.quickstart import QUICKSTART_CONFIG
from scldm_scale.train.stages import run_training

N_GENES = 30
TINY = dict(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8, mlp_ratio=2.0)


def _batch():
    dense = np.random.default_rng(0).poisson(1.5, size=(4, N_GENES)).astype(np.float32)
    dense[3] = 0
    dense[3, 7] = 5  # a cell with one expressed gene: it keeps it whatever is drawn
    return collate(sp.csr_matrix(dense), {})


def _twins(p: float) -> tuple[SetVAE, SetVAE]:
    torch.manual_seed(0)
    dropping = SetVAE(VAEConfig(**TINY, encoder_token_dropout=p), N_GENES)
    plain = SetVAE(VAEConfig(**TINY), N_GENES)
    plain.load_state_dict(dropping.state_dict())
    return dropping, plain


def test_a_training_pass_encodes_the_drawn_subset_and_decodes_every_gene():
    """The loss equals the plain model's on the same batch with the dropped tokens masked out: the draw is
    torch.rand(mask.shape) >= p on real tokens, and the target is untouched."""
    dropping, plain = _twins(0.5)
    batch = _batch()
    torch.manual_seed(7)
    loss, _ = dropping(batch)
    torch.manual_seed(7)
    kept = batch.mask & (torch.rand(batch.mask.shape) >= 0.5)
    kept[3] = batch.mask[3]  # the cell with one token keeps it, drawn or not
    assert kept[:3].any(dim=1).all()
    want, _ = plain(dataclasses.replace(batch, mask=kept))
    torch.testing.assert_close(loss, want)
    assert 0 < kept.sum() < batch.mask.sum()  # something was dropped, something kept
    with torch.no_grad():  # the latent of the subset is not the latent of the whole cell
        z_kept, _ = plain.encode(batch.gene_ids, batch.counts, kept)
        z_all, _ = plain.encode(batch.gene_ids, batch.counts, batch.mask)
    assert (z_kept[:3] - z_all[:3]).abs().max() > 1e-2
    torch.testing.assert_close(z_kept[3], z_all[3])


def test_every_cell_keeps_a_token_even_when_nearly_all_are_dropped():
    """At p = 0.99 most cells draw no token: such a cell keeps all of its tokens (the encoder never pools an
    empty set); one that draws some keeps exactly those."""
    dropping, _ = _twins(0.99)
    mask = _batch().mask
    fell_back = kept_some = 0
    for seed in range(20):
        torch.manual_seed(seed)
        kept = dropping.encoder_mask(mask)
        torch.manual_seed(seed)
        drawn = mask & (torch.rand(mask.shape) >= 0.99)
        assert (kept & ~mask).sum() == 0  # padding stays hidden
        assert torch.equal(kept[3], mask[3])
        for cell in range(3):
            if drawn[cell].any():
                assert torch.equal(kept[cell], drawn[cell])
                kept_some += 1
            else:
                assert torch.equal(kept[cell], mask[cell])
                fell_back += 1
    assert fell_back > 0 and kept_some > 0  # both branches were taken


def test_evaluation_passes_see_every_token():
    dropping, plain = _twins(0.5)
    batch = _batch()
    dropping.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropping(batch)[0], plain(batch)[0])
        z_drop, _ = dropping.encode(batch.gene_ids, batch.counts, batch.mask)
        z_plain, _ = plain.encode(batch.gene_ids, batch.counts, batch.mask)
    torch.testing.assert_close(z_drop, z_plain)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_a_rate_outside_zero_to_one_is_refused(p):
    with pytest.raises(ConfigError, match=r"model.encoder_token_dropout must be in \[0, 1\)"):
        load_config(QUICKSTART_CONFIG, [f"model.encoder_token_dropout={p}"])


def test_the_stage_trains_with_it_and_the_artifact_keeps_the_setting(synthetic_h5ad, tiny_overrides, tmp_path):
    extra = ["model.encoder_token_dropout=0.3", "train.max_steps=3"]
    path = run_training(load_config(None, [*tiny_overrides, *synthetic_vae_args(synthetic_h5ad, tmp_path), *extra]))
    vae = artifact.load(path, kind="vae").build_vae()
    assert vae.cfg.encoder_token_dropout == 0.3
    assert not vae.training  # a loaded model encodes every token
