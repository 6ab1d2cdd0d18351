"""train.init_gene_bias: the NB head's per-gene logit offsets start at the training cells' gene shares."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scldm_scale.config import ConfigError, load_config
from scldm_scale.data.batch import collate
from scldm_scale.models.likelihoods import GENE_BIAS_PSEUDOCOUNT, NegativeBinomialHead
from scldm_scale.quickstart import QUICKSTART_CONFIG
from scldm_scale.train.stages import gene_bias_from_data, gene_totals


def test_initialised_offsets_predict_the_data_shares():
    totals = torch.tensor([0.0, 1.0, 10.0, 989.0], dtype=torch.float64)
    head = NegativeBinomialHead(d_model=8, n_genes=4, theta_mode="gene")
    head.init_gene_bias(totals)
    torch.nn.init.zeros_(head.to_logit.weight)  # no hidden contribution: the offsets alone
    logits, _ = head.per_gene(torch.randn(2, 4, 8), torch.arange(4))
    log_mu, _ = head.distribution((logits, torch.zeros(4)), torch.full((2,), 1000.0))
    expected = 1000.0 * (totals + GENE_BIAS_PSEUDOCOUNT) / (totals + GENE_BIAS_PSEUDOCOUNT).sum()
    np.testing.assert_allclose(log_mu.detach().exp()[0].numpy(), expected.numpy(), rtol=1e-5)
    assert abs(head.gene_bias.mean().item()) < 1e-5  # centred


def test_gene_totals_sum_the_ordered_stream_in_vocabulary_positions():
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(0.5, (10, 6)).astype(np.float32))
    positions = np.array([5, 0, 3, 1, 2, 4])  # column j is vocabulary gene positions[j]
    batches = [collate(counts[i : i + 4], {}, decode_gene_ids=positions) for i in range(0, 10, 4)]
    expected = np.zeros(6)
    expected[positions] = np.asarray(counts.sum(0)).ravel()
    np.testing.assert_allclose(gene_totals(iter(batches), 6).numpy(), expected)
    # At most max_cells cells are read (whole batches): the first batch only.
    first = np.zeros(6)
    first[positions] = np.asarray(counts[:4].sum(0)).ravel()
    np.testing.assert_allclose(gene_totals(iter(batches), 6, max_cells=3).numpy(), first)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], False),  # every gene decoded: each offset is trained every step
        (["model.decode_genes=64"], True),  # gene subsets: from the data
        (["model.decode_genes=1000"], False),  # a "subset" of every gene
        (["model.decode_genes=64", "model.likelihood=gaussian"], False),  # no per-gene logits to set
        (["model.decode_genes=64", "train.init_gene_bias=zero"], False),
        (["train.init_gene_bias=data"], True),
    ],
)
def test_auto_starts_from_the_data_when_steps_decode_gene_subsets(overrides, expected):
    cfg = load_config(QUICKSTART_CONFIG, overrides)
    assert gene_bias_from_data(cfg, n_genes=1000) is expected


def test_data_offsets_need_an_nb_model_built_in_memory():
    with pytest.raises(ConfigError, match="train.init_gene_bias=data"):
        load_config(QUICKSTART_CONFIG, ["train.init_gene_bias=data", "model.likelihood=gaussian"])
