"""A model trained on one gene vocabulary used on data with another (genes missing, extra and reordered):
embed, classify, the VAE reconstruction of `evaluate` and a prior trained on a frozen VAE (stage=ldm) match genes,
encode without the missing ones (absent tokens) and report how many were missing."""

import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scldm_test_helpers import synthetic_vae_args

from scldm_scale import artifact
from scldm_scale.config import load_config
from scldm_scale.data.counts import DataError
from scldm_scale.evaluate.classify import classify
from scldm_scale.evaluate.embed import EMBED_KEY, UNS_KEY, embed
from scldm_scale.evaluate.reconstruction import reconstruction_of
from scldm_scale.train.stages import run_training

MISSING = ["gene_3", "gene_7", "gene_11"]
# Padding to another batch's longest cell changes the attention sums' rounding, not their value.
ATOL = 1e-5


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory, synthetic_h5ad, tiny_overrides):
    out = tmp_path_factory.mktemp("cross_vae")
    return run_training(
        load_config(None, [*tiny_overrides, *synthetic_vae_args(synthetic_h5ad, out), "train.max_steps=3"])
    )


@pytest.fixture(scope="module")
def source(synthetic_h5ad) -> ad.AnnData:
    return ad.read_h5ad(synthetic_h5ad)


@pytest.fixture(scope="module")
def other(source, tmp_path_factory):
    """The same cells without MISSING, with 4 genes the model never saw, in reversed gene order."""
    kept = source[:, ~source.var_names.isin(MISSING)]
    extra = np.random.default_rng(3).poisson(1.0, size=(source.n_obs, 4)).astype(np.float32)
    genes = [*kept.var_names, *(f"extra_{j}" for j in range(4))][::-1]
    x = np.hstack([kept.X.toarray(), extra])[:, ::-1]
    adata = ad.AnnData(X=sp.csr_matrix(x), obs=source.obs.copy())
    adata.var_names = genes
    path = tmp_path_factory.mktemp("cross_data") / "other.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def zeroed(source, tmp_path_factory):
    """The model's cells with MISSING set to zero: for a model of expressed-gene tokens, what absent tokens mean."""
    adata = source.copy()
    adata.X = sp.csr_matrix(adata.X.multiply(~source.var_names.isin(MISSING)[None, :]), dtype=np.float32)
    path = tmp_path_factory.mktemp("cross_zeroed") / "zeroed.h5ad"
    adata.write_h5ad(path)
    return path


def test_embed_reports_missing_genes_and_encodes_without_them(vae_ckpt, other, zeroed, caplog):
    with caplog.at_level(logging.WARNING, logger="scldm_scale.evaluate.embed"):
        got = embed(vae_ckpt, other, allow_missing_genes=True, progress=False)
    assert "3 of the model's 50 genes are missing" in caplog.text
    settings = got.uns[UNS_KEY]
    assert (settings["n_genes_vocabulary"], settings["n_genes_used"], settings["n_genes_missing"]) == (50, 47, 3)
    expected = embed(vae_ckpt, zeroed, progress=False).obsm[EMBED_KEY]
    np.testing.assert_allclose(got.obsm[EMBED_KEY], expected, atol=ATOL)


def test_classify_reports_missing_genes(vae_ckpt, other, tmp_path):
    result = classify(vae_ckpt, other, "cell_type", tmp_path, allow_missing_genes=True)
    assert result["settings"]["n_genes_missing"] == 3
    with pytest.raises(DataError, match="3 of the model's 50 genes are missing"):
        classify(vae_ckpt, other, "cell_type", tmp_path)


def test_reconstruction_scores_the_measured_genes(vae_ckpt, source, other, caplog):
    with caplog.at_level(logging.WARNING, logger="scldm_scale.evaluate.embed"):
        got = reconstruction_of(str(vae_ckpt), ad.read_h5ad(other), torch.device("cpu"))[0]
    assert "3 of the model's 50 genes are missing" in caplog.text
    assert got["n_genes_missing"] == 3 and got["n_cells"] == source.n_obs
    # The same scores as on the model's cells over the 47 measured genes alone, in the model's order: extra
    # genes are dropped, the order does not matter, and the measured genes are scored with the softmax and
    # library size over them.
    measured = source[:, ~source.var_names.isin(MISSING)].copy()
    expected = reconstruction_of(str(vae_ckpt), measured, torch.device("cpu"))[0]
    assert got == pytest.approx(expected, rel=1e-6)
    complete = reconstruction_of(str(vae_ckpt), source, torch.device("cpu"))[0]
    assert complete["n_genes_missing"] == 0 and complete["nll_per_cell"] > got["nll_per_cell"]


def _ldm(data, vae_ckpt, ckpt_dir, tiny_overrides, *extra):
    overrides = [
        "stage=ldm",
        *tiny_overrides,
        "data.source=h5ad",
        f"data.path={data}",
        "data.condition_keys=[cell_type]",
    ]
    overrides += [f"train.vae_checkpoint={vae_ckpt}", f"train.ckpt_dir={ckpt_dir}", "train.max_steps=2", *extra]
    return load_config(None, overrides)


def test_a_prior_on_a_frozen_vae_trains_on_data_with_another_vocabulary(
    vae_ckpt, other, zeroed, tiny_overrides, tmp_path, caplog
):
    with pytest.raises(DataError, match="3 genes of the model's vocabulary are missing.*data.allow_missing_genes=true"):
        run_training(_ldm(other, vae_ckpt, tmp_path / "refused", tiny_overrides))
    with caplog.at_level(logging.WARNING, logger="scldm_scale.data.source"):
        ldm = artifact.load(
            run_training(_ldm(other, vae_ckpt, tmp_path / "other", tiny_overrides, "data.allow_missing_genes=true"))
        )
    assert "3 of the model's 50 genes are missing from the data: absent tokens" in caplog.text
    assert ldm.vae.genes.ids == artifact.load(vae_ckpt).genes.ids  # the prior's cells decode every gene
    reference = artifact.load(run_training(_ldm(zeroed, vae_ckpt, tmp_path / "zeroed", tiny_overrides)))
    torch.testing.assert_close(ldm.latent_mean, reference.latent_mean, rtol=0, atol=ATOL)
    torch.testing.assert_close(ldm.latent_std, reference.latent_std, rtol=0, atol=ATOL)
