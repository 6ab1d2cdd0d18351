"""Generation draws counts a chunk of genes at a time into a sparse matrix (Generator._sample_counts)."""

from types import SimpleNamespace

import scipy.sparse as sp
import torch

from scldm_scale.config import VAEConfig
from scldm_scale.generate import Generator
from scldm_scale.models.vae import SetVAE


def test_counts_are_drawn_in_gene_chunks_into_csr_with_the_model_mean():
    n_genes, n_cells = 13, 4000
    tiny = dict(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8, mlp_ratio=2.0)
    torch.manual_seed(0)
    vae = SetVAE(VAEConfig(**tiny, decode_chunk_genes=5), n_genes).eval()
    z = torch.randn(1, 4, 8).expand(n_cells, -1, -1)  # one cell's latent, drawn n_cells times
    genes, library = torch.arange(n_genes), torch.full((n_cells,), 300.0)
    with torch.no_grad():
        counts = Generator._sample_counts(SimpleNamespace(vae=vae), z, genes, library)
        log_mu, log_theta = vae.distribution(z[:1], genes, library[:1])
    assert sp.isspmatrix_csr(counts) and counts.shape == (n_cells, n_genes) and counts.dtype.kind == "i"
    mu, theta = log_mu[0].exp().double(), log_theta[0].exp().double()
    standard_error = ((mu + mu**2 / theta) / n_cells).sqrt()
    drawn_mean = torch.from_numpy(counts.mean(axis=0).A1)
    assert ((drawn_mean - mu).abs() < 5 * standard_error).all()  # every chunk, the last (3 genes) included
