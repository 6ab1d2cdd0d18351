"""`train.init_from`: a VAE fine-tuned on data with another gene set copies exactly the shared genes' rows."""

import logging

import anndata as ad
import numpy as np
import pytest
import torch
from scldm_test_helpers import synthetic_vae_args

from scldm_scale import artifact
from scldm_scale.artifact import CheckpointError, LDMArtifact
from scldm_scale.config import ConfigError, PriorConfig, load_config
from scldm_scale.data.vocab import GeneVocabulary
from scldm_scale.models.dit import DiT
from scldm_scale.models.vae import SetVAE
from scldm_scale.train.finetune import init_from, per_gene_parameters
from scldm_scale.train.stages import run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_h5ad, tiny_overrides):
    """A tiny VAE trained on the 50 synthetic genes gene_0..gene_49."""
    out = tmp_path_factory.mktemp("finetune_vae")
    return run_training(
        load_config(None, [*tiny_overrides, *synthetic_vae_args(synthetic_h5ad, out), "train.max_steps=3"])
    )


@pytest.fixture(scope="module")
def other_genes_h5ad(tmp_path_factory, synthetic_h5ad):
    """The same cells over genes gene_49..gene_10 (reversed; gene_0..gene_9 absent) and 6 new genes."""
    source = ad.read_h5ad(synthetic_h5ad)
    kept = source[:, [f"gene_{j}" for j in range(49, 9, -1)]].X.toarray()
    new = np.random.default_rng(1).poisson(2.0, size=(source.n_obs, 6)).astype(np.float32)
    genes = [f"gene_{j}" for j in range(49, 9, -1)] + [f"new_{j}" for j in range(6)]
    adata = ad.AnnData(X=np.hstack([kept, new]), obs=source.obs.copy())
    adata.var_names = genes
    path = tmp_path_factory.mktemp("finetune_data") / "other.h5ad"
    adata.write_h5ad(path)
    return path


def test_per_gene_parameters_are_those_sized_by_the_gene_count(trained):
    names = per_gene_parameters(artifact.load(trained).config)
    assert {"gene_embedding.weight", "head.gene_bias", "head.log_theta"} <= names
    assert not names & {"inducing_points", "to_latent.weight", "head.to_logit.weight"}


def test_init_from_copies_exactly_the_shared_genes_rows(trained, other_genes_h5ad):
    model = artifact.load(trained)
    old = model.build_vae().state_dict()
    genes = GeneVocabulary(ad.read_h5ad(other_genes_h5ad, backed="r").var_names.tolist())
    torch.manual_seed(7)
    vae = SetVAE(model.config, len(genes))
    fresh = {k: v.clone() for k, v in vae.state_dict().items()}
    alignment = init_from(vae, genes, trained)
    new = vae.state_dict()
    shared_new = np.arange(40)  # gene_49..gene_10 in the new vocabulary
    shared_old = np.arange(49, 9, -1)  # their rows in the trained model
    np.testing.assert_array_equal(np.sort(alignment.columns), shared_new)
    per_gene = per_gene_parameters(model.config)
    for name, tensor in new.items():
        if name in per_gene:
            torch.testing.assert_close(tensor[shared_new], old[name][shared_old], rtol=0, atol=0)
            torch.testing.assert_close(tensor[40:], fresh[name][40:], rtol=0, atol=0)  # new genes: fresh init
        else:
            torch.testing.assert_close(tensor, old[name], rtol=0, atol=0)


def test_fine_tuning_trains_on_the_new_vocabulary(trained, other_genes_h5ad, tiny_overrides, tmp_path, caplog):
    overrides = [*tiny_overrides, *synthetic_vae_args(other_genes_h5ad, tmp_path), "train.max_steps=2"]
    with caplog.at_level(logging.INFO, logger="scldm_scale.train.finetune"):
        path = run_training(load_config(None, [*overrides, f"train.init_from={trained}"]))
    assert "40 of the 46 genes copied from the model (matched by id), 6 new genes initialised afresh" in caplog.text
    assert "10 of the model's 50 genes are not in the new data" in caplog.text
    tuned = artifact.load(path)
    assert tuned.genes.ids == ad.read_h5ad(other_genes_h5ad, backed="r").var_names.tolist()
    losses = [r["loss"] for r in tuned.training["history"]]
    assert len(losses) == 2 and np.isfinite(losses).all()


def test_another_architecture_or_stage_is_refused(trained, other_genes_h5ad, tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, *synthetic_vae_args(other_genes_h5ad, tmp_path), "train.max_steps=1"]
    with pytest.raises(CheckpointError, match=r"architecture differs: model.d_model=32 \(the model has 16\)"):
        run_training(load_config(None, [*overrides, f"train.init_from={trained}", "model.d_model=32"]))
    with pytest.raises(ConfigError, match="train.init_from fine-tunes a VAE"):
        load_config(None, [*overrides, "stage=ldm", f"train.vae_checkpoint={trained}", f"train.init_from={trained}"])


def test_an_ldm_model_gives_its_vae(trained, other_genes_h5ad, tmp_path):
    model = artifact.load(trained)
    m, latent_dim = model.config.n_latent_tokens, model.config.latent_dim
    prior = PriorConfig(d_model=16, n_heads=2, n_layers=1)
    ldm = LDMArtifact(
        vae=model,
        prior_config=prior,
        n_classes={"cell_type": 3},
        latent_mean=torch.zeros(m, latent_dim),
        latent_std=torch.ones(m, latent_dim),
        prior_weights=DiT(prior, m, latent_dim, {"cell_type": 3}).state_dict(),
        prior_ema_weights={},
    ).save(tmp_path / "ldm-model")
    genes = GeneVocabulary(ad.read_h5ad(other_genes_h5ad, backed="r").var_names.tolist())
    from_vae, from_ldm = SetVAE(model.config, len(genes)), SetVAE(model.config, len(genes))
    from_ldm.load_state_dict(from_vae.state_dict())
    init_from(from_vae, genes, trained)
    init_from(from_ldm, genes, ldm)
    for name, tensor in from_vae.state_dict().items():
        torch.testing.assert_close(from_ldm.state_dict()[name], tensor, rtol=0, atol=0)
