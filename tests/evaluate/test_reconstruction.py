"""VAE reconstruction metrics: streamed over batches of cells and chunks of genes, equal to the whole-matrix ones."""

import numpy as np
import scipy.sparse as sp
import torch

from scldm_scale.config import VAEConfig
from scldm_scale.data.dataset import CellDataset
from scldm_scale.evaluate.metrics import normalize_log1p, pearson
from scldm_scale.evaluate.reconstruction import StreamingPearson, reconstruction_metrics
from scldm_scale.models.vae import SetVAE


def test_streaming_pearson_equals_the_whole_array():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 13))
    y = 0.5 * x + rng.normal(-1.0, 1.0, size=(50, 13))
    streamed = StreamingPearson()
    for rows in (slice(0, 1), slice(1, 20), slice(20, 50)):  # uneven blocks, one of a single row
        streamed.update(x[rows], y[rows])
    assert abs(streamed.value() - pearson(x.ravel(), y.ravel())) < 1e-12


def test_reconstruction_in_gene_chunks_and_cell_batches_matches_one_pass(monkeypatch):
    rng = np.random.default_rng(1)
    n_cells, n_genes = 11, 23
    counts = sp.csr_matrix(rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32) + np.eye(n_cells, n_genes))
    dataset = CellDataset(counts, [f"g{i}" for i in range(n_genes)], {}, {}, np.full(n_cells, "test"))
    tiny = dict(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8, mlp_ratio=2.0)
    torch.manual_seed(0)
    chunked = SetVAE(VAEConfig(**tiny, decode_chunk_genes=5), n_genes)
    monkeypatch.setattr("scldm_scale.evaluate.reconstruction.BATCH", 4)
    got = reconstruction_metrics(chunked, dataset, np.arange(n_cells), torch.device("cpu"))
    # The same model decoding every gene of every cell at once, scored on whole matrices.
    batch = dataset.batch(np.arange(n_cells))
    with torch.no_grad():
        z, _ = chunked.encode(batch.gene_ids, batch.counts, batch.mask, sample=False)
        hidden = chunked.decode(z, batch.decode_gene_ids)
        distribution = chunked.head.distribution(
            chunked.head.per_gene(hidden, batch.decode_gene_ids), batch.library_size
        )
        nll = -chunked.head.log_prob(distribution, batch.library_size, batch.target).sum(-1).double().mean()
        mean = chunked.head.mean(distribution, batch.library_size).double().numpy()
    assert got["n_cells"] == n_cells
    assert abs(got["nll_per_cell"] - nll.item()) < 1e-4 * abs(nll.item())
    want = pearson(normalize_log1p(counts).ravel(), normalize_log1p(mean).ravel())
    assert abs(got["pearson_lognorm"] - want) < 1e-6
