"""model.latent_gene_path: a gene-specific linear readout of the latent added to each gene's logit, zero at init."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scldm_test_helpers import synthetic_vae_args

from scldm_scale import artifact
from scldm_scale.config import ConfigError, VAEConfig, load_config
from scldm_scale.data.batch import collate
from scldm_scale.models.vae import SetVAE
from scldm_scale.quickstart import QUICKSTART_CONFIG, WIDE_VAE_OVERRIDES
from scldm_scale.train.stages import run_training

N_GENES = 12
TINY = dict(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8, mlp_ratio=2.0)


def _batch():
    dense = np.random.default_rng(0).poisson(2.0, size=(3, N_GENES)).astype(np.float32)
    dense[:, 0] += 1
    return collate(sp.csr_matrix(dense), {})


def test_the_path_starts_at_zero_and_then_shifts_each_gene_by_its_own_loading():
    torch.manual_seed(0)
    plain = SetVAE(VAEConfig(**TINY), N_GENES)
    with_path = SetVAE(VAEConfig(**TINY, latent_gene_path=True), N_GENES)
    missing, unexpected = with_path.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["latent_gene_loadings.weight", "latent_to_gene.weight"] and not unexpected
    assert with_path.latent_gene_loadings.weight.abs().max() == 0  # silent at init
    genes = torch.arange(N_GENES)
    z = torch.randn(2, *plain.latent_shape)
    with torch.no_grad():
        torch.testing.assert_close(with_path.decode_per_gene(z, genes)[0], plain.decode_per_gene(z, genes)[0])
        torch.nn.init.normal_(with_path.latent_gene_loadings.weight, std=1.0)
        shift = with_path.decode_per_gene(z, genes)[0] - plain.decode_per_gene(z, genes)[0]  # (2, G)
        cell_vec = with_path.latent_to_gene(z.flatten(1))  # (2, E)
        want = cell_vec @ with_path.latent_gene_loadings(genes).T
    torch.testing.assert_close(shift, want, rtol=1e-4, atol=1e-5)
    # Gene-specific: the softmax over genes does not cancel it (a shift shared by every gene would be constant).
    assert (shift - shift.mean(-1, keepdim=True)).abs().max() > 1e-3


def test_the_latent_gets_a_gradient_through_the_path_alone():
    torch.manual_seed(0)
    vae = SetVAE(VAEConfig(**TINY, latent_gene_path=True), N_GENES)
    torch.nn.init.normal_(vae.latent_gene_loadings.weight, std=0.1)
    batch = _batch()
    z = torch.randn(3, *vae.latent_shape, requires_grad=True)
    genes = batch.decode_gene_ids
    target = batch.target
    nll = -vae.log_prob(z, genes, batch.library_size, target).sum()
    (grad_with,) = torch.autograd.grad(nll, z)
    with torch.no_grad():
        vae.latent_gene_loadings.weight.zero_()
    nll = -vae.log_prob(z, genes, batch.library_size, target).sum()
    (grad_without,) = torch.autograd.grad(nll, z)
    assert (grad_with - grad_without).abs().max() > 1e-3


def test_training_moves_the_loadings_first_then_the_projection():
    """U starts at zero, so the first step's gradient reaches U (first order in the latent) and not W; after
    one step both get one, and the loss is finite throughout."""
    torch.manual_seed(0)
    vae = SetVAE(VAEConfig(**TINY, latent_gene_path=True), N_GENES)
    batch = _batch()
    opt = torch.optim.SGD(vae.parameters(), lr=0.1)
    grads = []
    for _ in range(2):
        opt.zero_grad()
        loss, _ = vae(batch)
        assert torch.isfinite(loss)
        loss.backward()
        grads.append((vae.latent_gene_loadings.weight.grad.abs().sum(), vae.latent_to_gene.weight.grad.abs().sum()))
        opt.step()
    assert grads[0][0] > 0 and grads[0][1] == 0
    assert grads[1][0] > 0 and grads[1][1] > 0


def test_encoder_warmup_freezes_the_encoder_for_its_training_passes_only():
    torch.manual_seed(0)
    vae = SetVAE(VAEConfig(**TINY, encoder_warmup_steps=2), N_GENES)
    batch = _batch()
    encoder = [vae.inducing_points, *vae.pool.parameters(), *vae.to_latent.parameters()]
    got = []
    with torch.no_grad():
        vae.eval()
        vae(batch)  # evaluation passes do not count
        vae.train()
    for _ in range(3):
        vae.zero_grad(set_to_none=True)
        vae(batch)[0].backward()
        got.append(all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder))
        assert vae.head.to_logit.weight.grad.abs().sum() > 0  # the decoder trains throughout
    assert got == [False, False, True]
    assert int(vae.state_dict()["training_passes"]) == 3  # a resumed run does not warm up again


def test_a_negative_warmup_is_refused():
    with pytest.raises(ConfigError, match="model.encoder_warmup_steps must be >= 0"):
        load_config(QUICKSTART_CONFIG, ["model.encoder_warmup_steps=-1"])


def test_a_gene_subset_vae_trains_with_the_wide_data_settings_and_reloads(synthetic_h5ad, tiny_overrides, tmp_path):
    """The settings quickstart --data adds for subset steps, through the training stage: the warm-up counter and
    the loadings travel in the artifact."""
    extra = [*WIDE_VAE_OVERRIDES, "model.encoder_warmup_steps=2", "model.decode_genes=20", "train.max_steps=4"]
    path = run_training(load_config(None, [*tiny_overrides, *synthetic_vae_args(synthetic_h5ad, tmp_path), *extra]))
    vae = artifact.load(path, kind="vae").build_vae()
    assert vae.cfg.latent_gene_path and vae.cfg.pooling_weights == "count"
    assert int(vae.training_passes) == 4
    assert vae.latent_gene_loadings.weight.abs().sum() > 0  # trained away from its zero start
