"""VAE reconstruction on held-out cells: NB negative log-likelihood per cell and the Pearson
correlation of reconstructed vs observed log-normalised counts (the paper's reconstruction table)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from scldm_scale.data.dataset import CellDataset
from scldm_scale.evaluate.embed import Embedder, align_input
from scldm_scale.evaluate.metrics import normalize_log1p, pearson
from scldm_scale.models.vae import SetVAE

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
    """reconstruction_metrics of a vae or ldm model's VAE on the cells of an AnnData of raw counts.

    The cells' genes are put in the model's vocabulary order (embed.align_input); a vocabulary gene
    the cells lack is an error (the likelihood is over every vocabulary gene), other genes are dropped.
    """
    embedder = Embedder.from_artifact(checkpoint, device=str(device))
    columns = align_input(adata.var, embedder.genes, "the real cells", False).columns
    counts = sp.csr_matrix(adata.X[:, columns], dtype=np.float32)
    split = np.full(adata.n_obs, "test")
    dataset = CellDataset(counts, embedder.genes.ids, {}, {}, split, embedder.policy)
    return reconstruction_metrics(embedder.vae, dataset, np.arange(adata.n_obs), device)
