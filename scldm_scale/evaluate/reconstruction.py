"""VAE reconstruction on held-out cells: NB negative log-likelihood per cell and the Pearson
correlation of reconstructed vs observed log-normalised counts (the paper's reconstruction table)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scldm_scale.data.counts import DataError
from scldm_scale.data.dataset import CellDataset
from scldm_scale.evaluate.metrics import normalize_log1p, pearson
from scldm_scale.models.vae import SetVAE
from scldm_scale.train.checkpoint import CheckpointError, load_checkpoint
from scldm_scale.train.stages import load_vae

BATCH = 256


@torch.no_grad()
def reconstruction_metrics(vae: SetVAE, dataset: CellDataset, idx: np.ndarray, device: torch.device) -> dict:
    vae.eval()
    nll, means = [], []
    for start in range(0, len(idx), BATCH):
        batch = dataset.batch(idx[start : start + BATCH]).to(device)
        z, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask, sample=False)
        hidden = vae.decode(z, batch.decode_gene_ids)
        nll.append(-vae.log_prob(hidden, batch.decode_gene_ids, batch.library_size, batch.target).sum(-1).cpu())
        means.append(vae.head.mean(hidden, batch.decode_gene_ids, batch.library_size).cpu())
    observed = normalize_log1p(dataset.counts[idx])
    reconstructed = normalize_log1p(torch.cat(means).double().numpy())
    return {
        "nll_per_cell": float(torch.cat(nll).double().mean()),
        "pearson_lognorm": pearson(observed.ravel(), reconstructed.ravel()),
        "n_cells": int(len(idx)),
    }


def reconstruction_of(checkpoint: str, adata: ad.AnnData, device: torch.device) -> dict:
    """reconstruction_metrics of a VAE or LDM checkpoint's VAE on the cells of an AnnData of raw counts.

    The cells' genes are put in the checkpoint's vocabulary order; a vocabulary gene the cells lack is
    an error (the likelihood is over every vocabulary gene), genes outside the vocabulary are ignored.
    """
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("kind") not in ("vae", "ldm"):
        raise CheckpointError(f"{checkpoint} is a {ckpt.get('kind')!r} checkpoint; pass a VAE or LDM checkpoint")
    vocabulary = pd.Index(ckpt["gene_names"])
    missing = vocabulary.difference(adata.var_names, sort=False)
    if len(missing):
        raise DataError(
            f"{len(missing)} genes of the checkpoint's vocabulary are missing from the real cells, e.g. "
            f"{missing[:5].tolist()}; the reconstruction needs every vocabulary gene"
        )
    counts = sp.csr_matrix(adata[:, vocabulary].X, dtype=np.float32)
    dataset = CellDataset(counts, vocabulary.tolist(), {}, {}, np.full(adata.n_obs, "test"))
    return reconstruction_metrics(load_vae(ckpt).to(device), dataset, np.arange(adata.n_obs), device)
