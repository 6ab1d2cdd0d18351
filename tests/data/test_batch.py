"""The CellBatch and its collate (token policies, the CSR canonicaliser, the zero-token sampler) and the
label encoder."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scldm_scale.data.batch import LabelEncoder, TokenPolicy, canonical_csr, collate, sample_zero_genes
from scldm_scale.data.counts import DataError

# --- collate --------------------------------------------------------------------------------------------


def _ragged_counts(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(1.0, size=(7, 13)).astype(np.float32) * (rng.random((7, 13)) < 0.4)
    dense[2] = 0.0
    dense[2, 5] = 4.0  # a cell with a single gene
    dense[4, :] = np.arange(1, 14)  # the longest cell: every gene
    return sp.csr_matrix(dense)


def test_collate_tokens_mask_target_and_library_size():
    counts = _ragged_counts()
    conditions = {"cell_type": np.arange(7, dtype=np.int64) % 3}
    batch = collate(counts, conditions)
    dense = counts.toarray()
    lengths = (dense > 0).sum(axis=1)
    assert batch.gene_ids.shape == batch.counts.shape == batch.mask.shape == (7, 13)
    assert batch.size == 7
    assert batch.gene_ids.dtype == torch.long and batch.mask.dtype == torch.bool
    assert batch.target.dtype == batch.counts.dtype == batch.library_size.dtype == torch.float32
    for i in range(7):
        n = lengths[i]
        row = counts[i]
        assert batch.mask[i].tolist() == [True] * n + [False] * (13 - n)
        assert batch.gene_ids[i, :n].tolist() == row.indices.tolist()
        np.testing.assert_array_equal(batch.counts[i, :n].numpy(), row.data)
        assert (batch.counts[i, n:] == 0).all()
        # Every real token is an expressed gene: the mask is True exactly on the nonzero entries.
        np.testing.assert_array_equal(np.sort(batch.gene_ids[i, :n].numpy()), np.flatnonzero(dense[i]))
    np.testing.assert_array_equal(batch.target.numpy(), dense)
    assert batch.decode_gene_ids.tolist() == list(range(13))
    np.testing.assert_allclose(batch.library_size.numpy(), dense.sum(axis=1))
    np.testing.assert_array_equal(batch.conditions["cell_type"].numpy(), conditions["cell_type"])


def test_collate_pads_to_the_longest_cell_in_the_batch():
    counts = _ragged_counts()[[0, 2]]
    batch = collate(counts, {})
    assert batch.mask.shape[1] == max(np.diff(counts.indptr))
    assert batch.mask.sum().item() == counts.nnz


# --- LabelEncoder ---------------------------------------------------------------------------------------


def test_label_encoder_round_trip_and_null_id():
    enc = LabelEncoder.fit("cell_type", np.array(["b", "a", "c", "a"]))
    assert enc.values == ["a", "b", "c"]
    assert enc.null_id == 3
    assert enc.encode(["c", "a", "b"]).tolist() == [2, 0, 1]
    again = LabelEncoder.from_state(enc.state_dict())
    assert again.key == "cell_type" and again.values == enc.values


def test_label_encoder_unknown_value_lists_known_values():
    enc = LabelEncoder("cell_type", ["B cell", "T cell"])
    with pytest.raises(
        DataError, match=r"condition cell_type='NK' is not known to this model; known values: B cell, T cell"
    ):
        enc.encode(["T cell", "NK"])


# --- encoder token policies -------------------------------------------------------------------------------


def _token_sets(batch) -> list[set[int]]:
    return [set(batch.gene_ids[i][batch.mask[i]].tolist()) for i in range(batch.size)]


def test_dense_tokens_cover_every_gene_with_its_count():
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(0.3, size=(5, 12)).astype(np.float32))
    batch = collate(counts, {}, policy=TokenPolicy("dense"))
    assert batch.gene_ids.shape == (5, 12) and bool(batch.mask.all())
    dense = counts.toarray()
    for i in range(5):
        np.testing.assert_array_equal(batch.counts[i].numpy(), dense[i, batch.gene_ids[i].numpy()])


def test_expressed_plus_zeros_adds_sampled_zero_genes_reproducibly():
    rng = np.random.default_rng(1)
    counts = sp.csr_matrix(rng.poisson(0.2, size=(6, 30)).astype(np.float32))
    counts[0] = 0  # a row with no expressed genes (stored explicitly as zeros) still gets its zeros
    counts[1, :] = 1  # a row with no zeros gets nothing extra
    counts = sp.csr_matrix(counts)
    policy = TokenPolicy("expressed_plus_zeros", n_zero_tokens=4)
    batch = collate(counts, {}, policy=policy, rng=np.random.default_rng(7))
    again = collate(counts, {}, policy=policy, rng=np.random.default_rng(7))
    assert _token_sets(batch) == _token_sets(again)
    dense = counts.toarray()
    for i, tokens in enumerate(_token_sets(batch)):
        expressed = set(np.flatnonzero(dense[i]).tolist())
        extra = tokens - expressed
        assert expressed <= tokens
        assert len(extra) == min(4, 30 - len(expressed))
        assert all(dense[i, g] == 0 for g in extra)
    np.testing.assert_array_equal(batch.target.numpy(), dense)  # the target stays the dense row


# --- canonical_csr and sample_zero_genes -----------------------------------------------------------------


def test_canonical_csr_drops_stored_zeros_and_sorts_columns_without_touching_the_input():
    # Row 0 stores its columns out of order and an explicit zero; row 1 is empty.
    x = sp.csr_matrix((np.array([3.0, 0.0, 1.0]), np.array([4, 2, 0]), np.array([0, 3, 3])), shape=(2, 5))
    before = (x.data.copy(), x.indices.copy())
    out = canonical_csr(x)
    assert out.dtype == np.float32 and out.has_sorted_indices
    assert out.indices.tolist() == [0, 4] and out.data.tolist() == [1.0, 3.0]
    np.testing.assert_array_equal(out.toarray(), x.toarray())
    np.testing.assert_array_equal(x.data, before[0])  # the input is left as it was
    np.testing.assert_array_equal(x.indices, before[1])


def test_canonical_csr_shares_the_arrays_of_an_already_canonical_block():
    x = sp.csr_matrix(np.array([[0, 2, 0], [1, 0, 5]], dtype=np.float32))
    out = canonical_csr(x)
    assert np.shares_memory(out.data, x.data) and np.shares_memory(out.indices, x.indices)
    dense = canonical_csr(np.array([[0, 2, 0]]))  # dense input: made CSR
    assert dense.indices.tolist() == [1] and dense.dtype == np.float32


@pytest.mark.parametrize(("n_genes", "n_expressed", "n_zero_tokens"), [(30, 5, 4), (7, 5, 4), (7, 7, 3), (1, 0, 2)])
def test_sample_zero_genes_draws_distinct_unexpressed_genes_in_order(n_genes, n_expressed, n_zero_tokens):
    expressed = np.sort(np.random.default_rng(0).permutation(n_genes)[:n_expressed])
    picked = sample_zero_genes(expressed, n_genes, n_zero_tokens, np.random.default_rng(3))
    assert len(picked) == min(n_zero_tokens, n_genes - n_expressed)
    assert np.all(np.diff(picked) > 0)  # distinct and ascending
    assert not set(picked.tolist()) & set(expressed.tolist())
    assert set(picked.tolist()) <= set(range(n_genes))
    again = sample_zero_genes(expressed, n_genes, n_zero_tokens, np.random.default_rng(3))
    np.testing.assert_array_equal(picked, again)


def test_collate_draws_each_cells_zero_tokens_with_the_sampler_in_row_order():
    """The loaders' zero tokens are the sampler's draws, row after row, from the batch's generator."""
    counts = canonical_csr(np.random.default_rng(2).poisson(0.3, size=(4, 20)))
    batch = collate(counts, {}, policy=TokenPolicy("expressed_plus_zeros", 3), rng=np.random.default_rng(11))
    rng = np.random.default_rng(11)
    for i in range(4):
        expressed = counts.indices[counts.indptr[i] : counts.indptr[i + 1]]
        expected = np.concatenate([expressed, sample_zero_genes(expressed, 20, 3, rng)])
        assert batch.gene_ids[i][batch.mask[i]].tolist() == expected.tolist()
