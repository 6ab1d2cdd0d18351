"""`scldm-scale embed`: posterior-mean latents of a tiny trained VAE, checked against the VAE on the collated cells,
for independence from batch and gene order, gene matching, missing genes and bad checkpoints."""

import json
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scldm_test_helpers import synthetic_vae_args

import scldm_scale
from scldm_scale import artifact
from scldm_scale.artifact import CheckpointError, LDMArtifact
from scldm_scale.cli import main
from scldm_scale.config import PriorConfig, load_config
from scldm_scale.data.batch import TokenPolicy, collate
from scldm_scale.data.counts import DataError
from scldm_scale.data.prepare import prepare
from scldm_scale.data.vocab import GeneVocabulary
from scldm_scale.evaluate.embed import EMBED_KEY, POOLED_KEY, UNS_KEY, embed
from scldm_scale.models.dit import DiT
from scldm_scale.train.stages import run_training

M, L = 4, 8  # model.n_latent_tokens, model.latent_dim of the tiny overrides
# Padding to another batch's longest cell changes the attention sums' rounding, not their value.
BATCH_ATOL = 1e-5


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory, synthetic_h5ad, tiny_overrides):
    out = tmp_path_factory.mktemp("embed_vae")
    overrides = [*tiny_overrides, *synthetic_vae_args(synthetic_h5ad, out), "train.max_steps=4"]
    return run_training(load_config(None, overrides))


@pytest.fixture(scope="module")
def reference(vae_ckpt, synthetic_h5ad) -> np.ndarray:
    """Latents (N, M, L) of the whole file in one batch, straight from the VAE."""
    vae = artifact.load(vae_ckpt).build_vae()
    batch = collate(ad.read_h5ad(synthetic_h5ad).X, {})
    with torch.no_grad():
        z, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask, sample=False)
    return z.numpy()


def _write(adata: ad.AnnData, path) -> str:
    adata.write_h5ad(path)
    return str(path)


def test_cli_writes_obs_and_both_embeddings(vae_ckpt, synthetic_h5ad, reference, tmp_path, capsys):
    out = tmp_path / "emb.h5ad"
    assert main(["embed", str(vae_ckpt), str(synthetic_h5ad), "--out", str(out), "--batch-size", "16"]) == 0
    assert "X_scldm (120, 32)" in capsys.readouterr().out
    emb, source = ad.read_h5ad(out), ad.read_h5ad(synthetic_h5ad)
    assert emb.shape == (120, 0)
    pd.testing.assert_frame_equal(emb.obs, source.obs)
    flat, pooled = emb.obsm[EMBED_KEY], emb.obsm[POOLED_KEY]
    assert flat.dtype == pooled.dtype == np.float32
    assert flat.shape == (120, M * L) and pooled.shape == (120, L)
    np.testing.assert_allclose(flat.reshape(120, M, L), reference, atol=BATCH_ATOL)
    np.testing.assert_allclose(pooled, flat.reshape(120, M, L).mean(1), rtol=1e-6, atol=1e-7)
    settings = emb.uns[UNS_KEY]
    assert (settings["n_latent_tokens"], settings["latent_dim"]) == (M, L)
    assert settings["checkpoint"] == str(vae_ckpt) and settings["checkpoint_kind"] == "vae"


def test_embedding_is_deterministic_and_independent_of_the_batch(vae_ckpt, synthetic_h5ad):
    small = embed(vae_ckpt, synthetic_h5ad, batch_size=7, progress=False).obsm[EMBED_KEY]
    again = embed(vae_ckpt, synthetic_h5ad, batch_size=7, progress=False).obsm[EMBED_KEY]
    whole = embed(vae_ckpt, synthetic_h5ad, batch_size=256, progress=False).obsm[EMBED_KEY]
    np.testing.assert_array_equal(small, again)
    np.testing.assert_allclose(small, whole, atol=BATCH_ATOL)


def test_gene_order_extra_genes_and_id_columns_do_not_change_the_embedding(vae_ckpt, synthetic_h5ad, tmp_path):
    source = ad.read_h5ad(synthetic_h5ad)
    expected = embed(vae_ckpt, synthetic_h5ad, progress=False).obsm[EMBED_KEY]
    # Genes reversed and shuffled, plus two genes the model does not know (dropped).
    extra = ad.AnnData(
        X=np.ones((source.n_obs, 2), dtype=np.float32), obs=source.obs, var=pd.DataFrame(index=["new_1", "new_2"])
    )
    shuffled = ad.concat([source, extra], axis=1, merge="first")
    shuffled = shuffled[:, np.random.default_rng(0).permutation(shuffled.n_vars)].copy()
    got = embed(vae_ckpt, _write(shuffled, tmp_path / "shuffled.h5ad"), progress=False).obsm[EMBED_KEY]
    np.testing.assert_array_equal(got, expected)  # tokens enter in vocabulary order: bit-identical
    # Symbols as var_names, the ids in a var column.
    by_column = source.copy()
    by_column.var["gene_ids"] = by_column.var_names.to_numpy()
    by_column.var_names = [f"SYMBOL{i}" for i in range(by_column.n_vars)]
    got = embed(vae_ckpt, _write(by_column, tmp_path / "symbols.h5ad"), progress=False).obsm[EMBED_KEY]
    np.testing.assert_array_equal(got, expected)


def test_missing_genes_are_an_error_unless_allowed_then_absent_like_zeros(vae_ckpt, synthetic_h5ad, tmp_path, capsys):
    source = ad.read_h5ad(synthetic_h5ad)
    dropped = ["gene_3", "gene_7", "gene_11"]
    partial = _write(source[:, ~source.var_names.isin(dropped)].copy(), tmp_path / "partial.h5ad")
    with pytest.raises(DataError, match=r"3 of the model's 50 genes are missing.*gene_3.*--allow-missing-genes"):
        embed(vae_ckpt, partial, progress=False)
    assert main(["embed", str(vae_ckpt), partial, "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "gene_3" in capsys.readouterr().err
    got = embed(vae_ckpt, partial, allow_missing_genes=True, progress=False).obsm[EMBED_KEY]
    # For a model trained on expressed genes, an absent gene is a gene with zero counts.
    zeroed = source.copy()
    zeroed.X = sp.csr_matrix(zeroed.X.multiply(~source.var_names.isin(dropped)[None, :]), dtype=np.float32)
    expected = embed(vae_ckpt, _write(zeroed, tmp_path / "zeroed.h5ad"), progress=False).obsm[EMBED_KEY]
    np.testing.assert_allclose(got, expected, atol=BATCH_ATOL)


def test_ldm_checkpoint_embeds_like_its_vae_and_other_files_are_refused(vae_ckpt, synthetic_h5ad, tmp_path, capsys):
    vae_model = artifact.load(vae_ckpt)
    cfg = vae_model.config
    dit = DiT(PriorConfig(d_model=16, n_heads=2, n_layers=1), cfg.n_latent_tokens, cfg.latent_dim, {"cell_type": 3})
    ldm = LDMArtifact(
        vae=vae_model,
        prior_config=PriorConfig(d_model=16, n_heads=2, n_layers=1),
        n_classes={"cell_type": 3},
        latent_mean=torch.zeros(M, L),
        latent_std=torch.ones(M, L),
        prior_weights=dit.state_dict(),
        prior_ema_weights={},
    ).save(tmp_path / "ldm-model")
    np.testing.assert_array_equal(
        embed(ldm, synthetic_h5ad, progress=False).obsm[EMBED_KEY],
        embed(vae_ckpt, synthetic_h5ad, progress=False).obsm[EMBED_KEY],
    )
    assert embed(ldm, synthetic_h5ad, progress=False).uns[UNS_KEY]["checkpoint_kind"] == "ldm"
    other = tmp_path / "other-model"
    other.mkdir()
    config = json.loads((ldm / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "kind": "prior"}))
    (other / "model.safetensors").write_bytes((ldm / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"kind 'prior' is not one of \('vae', 'ldm'\)"):
        embed(other, synthetic_h5ad, progress=False)
    corrupt = tmp_path / "corrupt-model"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps(config))
    (corrupt / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="missing or corrupt"):
        embed(corrupt, synthetic_h5ad, progress=False)
    assert main(["embed", str(corrupt), str(synthetic_h5ad), "--out", str(tmp_path / "x.h5ad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scldm-scale embed: error:") and "\n" not in err


def test_zero_tokens_are_drawn_per_cell_not_per_batch(vae_ckpt, synthetic_h5ad, tmp_path):
    model = artifact.load(vae_ckpt)
    with_zeros = replace(model, token_policy=TokenPolicy("expressed_plus_zeros", 5)).save(tmp_path / "zeros")
    small = embed(with_zeros, synthetic_h5ad, batch_size=7, progress=False).obsm[EMBED_KEY]
    whole = embed(with_zeros, synthetic_h5ad, batch_size=256, progress=False).obsm[EMBED_KEY]
    np.testing.assert_allclose(small, whole, atol=BATCH_ATOL)
    expressed_only = embed(vae_ckpt, synthetic_h5ad, progress=False).obsm[EMBED_KEY]
    assert np.abs(small - expressed_only).max() > 1e-3  # the zero tokens are there and matter


def test_soma_input_gives_the_h5ad_embedding(vae_ckpt, synthetic_h5ad, tmp_path):
    uri = prepare(synthetic_h5ad, tmp_path / "cells.soma", labels=["cell_type"], test_fraction=0.2, val_fraction=0.0)
    from_soma = embed(vae_ckpt, str(uri), progress=False)
    from_h5ad = embed(vae_ckpt, synthetic_h5ad, progress=False)
    assert list(from_soma.obs_names) == list(from_h5ad.obs_names)
    assert {"cell_type", "split", "n_counts"} <= set(from_soma.obs)
    np.testing.assert_allclose(from_soma.obsm[EMBED_KEY], from_h5ad.obsm[EMBED_KEY], atol=BATCH_ATOL)


def test_counts_are_read_from_a_layer_and_validated(vae_ckpt, synthetic_h5ad, tmp_path):
    source = ad.read_h5ad(synthetic_h5ad)
    expected = embed(vae_ckpt, synthetic_h5ad, progress=False).obsm[EMBED_KEY]
    layered = source.copy()
    layered.layers["counts"] = source.X.copy()
    layered.X = source.X.log1p()  # log-normalised X, counts in a layer
    path = _write(layered, tmp_path / "layered.h5ad")
    # The refusal names embed's own flag and the file's layers, not a training config key.
    with pytest.raises(DataError, match=r"non-integer values.*pass --layer with a layer \(counts\)") as refused:
        embed(vae_ckpt, path, progress=False)
    assert "data." not in str(refused.value)
    np.testing.assert_array_equal(embed(vae_ckpt, path, layer="counts", progress=False).obsm[EMBED_KEY], expected)
    with pytest.raises(DataError, match=r"no layer 'raw'; pass --layer with a layer \(counts\)"):
        embed(vae_ckpt, path, layer="raw", progress=False)
    with pytest.raises(DataError, match=r"--layer raw.X but the file has no .raw.X"):
        embed(vae_ckpt, path, layer="raw.X", progress=False)


def test_counts_in_raw_x_are_read_with_layer_raw_x(vae_ckpt, synthetic_h5ad, tmp_path):
    """The usual layout of published files: log-normalised X, raw counts (and their genes) in .raw."""
    source = ad.read_h5ad(synthetic_h5ad)
    expected = embed(vae_ckpt, synthetic_h5ad, progress=False).obsm[EMBED_KEY]
    published = source.copy()
    published.raw = source.copy()
    published.X = source.X.log1p()
    path = _write(published, tmp_path / "published.h5ad")
    with pytest.raises(DataError, match=r"non-integer values.*pass --layer with raw.X"):
        embed(vae_ckpt, path, progress=False)
    np.testing.assert_array_equal(embed(vae_ckpt, path, layer="raw.X", progress=False).obsm[EMBED_KEY], expected)
    in_memory = ad.read_h5ad(path)
    np.testing.assert_array_equal(embed(vae_ckpt, in_memory, layer="raw.X", progress=False).obsm[EMBED_KEY], expected)


def test_notebook_api_embeds_an_in_memory_anndata_like_the_cli(vae_ckpt, synthetic_h5ad, reference):
    adata = ad.read_h5ad(synthetic_h5ad)
    model = scldm_scale.load_model(vae_ckpt)
    returned = scldm_scale.embed_cells(model, adata, batch_size=16)
    assert returned is adata  # the embeddings go into the caller's AnnData
    np.testing.assert_allclose(adata.obsm[EMBED_KEY].reshape(-1, M, L), reference, atol=BATCH_ATOL)
    np.testing.assert_array_equal(
        adata.obsm[EMBED_KEY], embed(vae_ckpt, synthetic_h5ad, batch_size=16, progress=False).obsm[EMBED_KEY]
    )
    with pytest.raises(DataError, match="no layer 'counts'"):
        scldm_scale.embed_cells(model, adata, layer="counts")


def test_a_model_with_ensembl_ids_embeds_cells_keyed_by_symbol(vae_ckpt, synthetic_h5ad, tmp_path):
    model = artifact.load(vae_ckpt)
    symbols = model.genes.ids  # the synthetic cells' var_names play the symbols
    by_id = replace(model, genes=GeneVocabulary([f"ENSG{i:011d}" for i in range(len(symbols))], symbols))
    folder = by_id.save(tmp_path / "ensembl-model")
    expected = embed(vae_ckpt, synthetic_h5ad, progress=False).obsm[EMBED_KEY]
    np.testing.assert_array_equal(embed(folder, synthetic_h5ad, progress=False).obsm[EMBED_KEY], expected)
    adata = ad.read_h5ad(synthetic_h5ad)
    np.testing.assert_array_equal(scldm_scale.embed_cells(folder, adata).obsm[EMBED_KEY], expected)
