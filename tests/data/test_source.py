"""`open_train_cells` from an in-memory (h5ad) source with a trained model's vocabulary: the data's genes are
matched to it (here by name) and put in its order; vocabulary genes the data lacks are refused."""

import anndata as ad
import numpy as np
import pytest

from scldm_scale.config import DataConfig
from scldm_scale.data.source import open_train_cells
from scldm_scale.data.vocab import GeneVocabulary, MissingGenesError


def _cfg(path) -> DataConfig:
    return DataConfig(source="h5ad", path=str(path), condition_keys=["cell_type"])


def test_a_model_vocabulary_reorders_the_data_genes_matched_by_name(synthetic_h5ad):
    genes = ad.read_h5ad(synthetic_h5ad).var_names
    order = np.random.default_rng(0).permutation(len(genes))
    # Other ids than the data's (another annotation, say), the data's gene names as names, another order.
    vocabulary = GeneVocabulary([f"ENSG{j:03d}" for j in range(len(genes))], genes[order].tolist())
    cells = open_train_cells(_cfg(synthetic_h5ad), batch_size=8, seed=0, vocabulary=vocabulary)
    assert cells.vocabulary == vocabulary and cells.gene_names == vocabulary.ids
    plain = open_train_cells(_cfg(synthetic_h5ad), batch_size=8, seed=0)
    assert plain.vocabulary == GeneVocabulary(genes.tolist())
    for got, want in zip(cells.ordered(), plain.ordered(), strict=True):
        np.testing.assert_array_equal(got.target.numpy(), want.target.numpy()[:, order])


def test_vocabulary_genes_missing_from_the_data_are_refused(synthetic_h5ad):
    genes = ad.read_h5ad(synthetic_h5ad).var_names.tolist()
    with pytest.raises(MissingGenesError, match=r"2 genes of the model's vocabulary are missing from the data"):
        open_train_cells(_cfg(synthetic_h5ad), batch_size=8, seed=0, vocabulary=["absent_1", *genes, "absent_2"])
