"""VAE reconstruction on held-out cells: NB negative log-likelihood per cell and the Pearson correlation of
reconstructed vs observed log-normalised counts (the paper's reconstruction table), and the reconstruction
ceiling: counts drawn from the head's distribution of each encoded cell, which `evaluate` scores like generated
cells. A generator samples latents from its prior and decodes them through the same VAE, so the ceiling is what
it would score with a perfect prior: the ceiling's distance from the noise floor is the VAE's share of the error,
the generated cells' distance from the ceiling the prior's (library sizes included: the ceiling keeps each
cell's own, a generator draws them from its library-size model). Each ceiling cell is the reconstruction of
one of the real cells it is compared with, so on distribution distances it can land below the noise floor
(other real cells); a neighbour test (1-NN) still sees what the VAE smooths away."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from scldm_scale.data.dataset import CellDataset
from scldm_scale.evaluate.embed import Embedder, align_input
from scldm_scale.evaluate.metrics import normalize_log1p
from scldm_scale.generate import draw_counts
from scldm_scale.models.vae import SetVAE

BATCH = 256


class StreamingPearson:
    """Pearson correlation of all the entries of blocks seen one at a time (Chan et al.'s pairwise merge of
    means and co-moments, in float64): the cells x genes matrices are never held whole."""

    def __init__(self) -> None:
        self.n, self.mean_x, self.mean_y, self.m_xx, self.m_yy, self.m_xy = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
        n, mean_x, mean_y = x.size, x.mean(), y.mean()
        xc, yc = x - mean_x, y - mean_y
        total = self.n + n
        dx, dy, weight = mean_x - self.mean_x, mean_y - self.mean_y, self.n * n / total
        self.m_xx += xc @ xc + dx * dx * weight
        self.m_yy += yc @ yc + dy * dy * weight
        self.m_xy += xc @ yc + dx * dy * weight
        self.mean_x += dx * n / total
        self.mean_y += dy * n / total
        self.n = total

    def value(self) -> float:
        return float(self.m_xy / np.sqrt(self.m_xx * self.m_yy))


@torch.no_grad()
def reconstruction_metrics(
    vae: SetVAE, dataset: CellDataset, idx: np.ndarray, device: torch.device, ceiling_seed: int | None = None
) -> tuple[dict, sp.csr_matrix | None]:
    """The metrics and, with `ceiling_seed`, the reconstruction ceiling's counts (cells idx x the dataset's
    genes, CSR): each cell's posterior mean (what the prior is trained on) decoded and its counts drawn with its
    own library size, from the torch RNG seeded with ceiling_seed (as generation seeds it).

    Per batch of cells, the VAE decodes every gene in chunks (SetVAE.distribution) and only (cells, genes)
    blocks of one batch are ever dense; the counts are drawn a chunk of genes at a time (generate.draw_counts).
    """
    vae.eval()
    if ceiling_seed is not None:
        torch.manual_seed(ceiling_seed)
    nll, drawn = [], []
    correlation = StreamingPearson()
    for start in range(0, len(idx), BATCH):
        rows = idx[start : start + BATCH]
        batch = dataset.batch(rows).to(device)
        z, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask, sample=False)
        distribution = vae.distribution(z, batch.decode_gene_ids, batch.library_size)
        nll.append(-vae.head.log_prob(distribution, batch.library_size, batch.target).sum(-1).cpu())
        reconstructed = vae.head.mean(distribution, batch.library_size).cpu().double().numpy()
        correlation.update(normalize_log1p(dataset.counts[rows]), normalize_log1p(reconstructed))
        if ceiling_seed is not None:
            drawn.append(draw_counts(vae, distribution, batch.library_size))
    metrics = {
        "nll_per_cell": float(torch.cat(nll).double().mean()),
        "pearson_lognorm": correlation.value(),
        "n_cells": int(len(idx)),
    }
    return metrics, sp.vstack(drawn, format="csr") if drawn else None


def reconstruction_of(
    checkpoint: str | Embedder,
    adata: ad.AnnData,
    device: torch.device,
    ceiling_seed: int | None = None,
    what: str = "the real cells",
) -> tuple[dict, ad.AnnData | None]:
    """reconstruction_metrics of a vae or ldm model's VAE on the cells of an AnnData of raw counts, with
    n_genes_missing, and with `ceiling_seed` the reconstruction ceiling as an AnnData: the cells' obs, the
    measured vocabulary genes (the input's var rows of them, in the input's order), integer counts.

    The cells' genes are matched to the model's vocabulary (embed.align_input; genes outside it are dropped).
    Vocabulary genes the cells lack (a model trained on other data) are absent tokens for the encoder, and the
    scores are over the measured genes: their softmax and library size are over those genes, which is the
    likelihood of the counts of a gene subset given their total (the multinomial restricts to a subset).
    `what` names the cells in error messages. `checkpoint` may be a VAE already read (Embedder), so that
    several sets of cells are reconstructed with one read of the artifact.
    """
    embedder = checkpoint
    if not isinstance(embedder, Embedder):
        embedder = Embedder.from_artifact(checkpoint, device=str(device))
    alignment = align_input(adata.var, embedder.genes, what, allow_missing_genes=True)
    counts = sp.csr_matrix(adata.X[:, alignment.columns], dtype=np.float32)
    split = np.full(adata.n_obs, "test")
    genes = [embedder.genes.ids[i] for i in alignment.positions]
    dataset = CellDataset(counts, genes, {}, {}, split, embedder.policy, gene_positions=alignment.positions)
    metrics, drawn = reconstruction_metrics(embedder.vae, dataset, np.arange(adata.n_obs), device, ceiling_seed)
    metrics["n_genes_missing"] = len(alignment.missing)
    if drawn is None:
        return metrics, None
    order = np.argsort(alignment.columns)  # the input's gene order
    var = adata.var.iloc[alignment.columns[order]].copy()
    ceiling = ad.AnnData(X=drawn[:, order], obs=adata.obs.copy(), var=var)
    return metrics, ceiling
