"""Dataset building and its errors, the stratified split, the CellBatch collate and the shuffled stream."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scldm_scale.config import DataConfig
from scldm_scale.data.batch import LabelEncoder, TokenPolicy, collate
from scldm_scale.data.counts import DataError
from scldm_scale.data.dataset import ShuffledBatches, build_dataset
from scldm_scale.data.split import stratified_split


def _cfg(**kwargs) -> DataConfig:
    return DataConfig(condition_keys=kwargs.pop("condition_keys", ["cell_type"]), **kwargs)


# --- build_dataset -----------------------------------------------------------------------------------


def test_build_dataset_keeps_counts_conditions_and_makes_a_split(counts_adata):
    adata = counts_adata(n_cells=60, n_genes=20)
    ds = build_dataset(adata, _cfg(test_fraction=0.25))
    assert ds.n_genes == 20
    assert ds.gene_names == list(adata.var_names)
    np.testing.assert_array_equal(ds.counts.toarray(), adata.X.toarray())
    assert ds.encoders["cell_type"].values == ["type_0", "type_1", "type_2"]
    expected_ids = np.array([int(v[-1]) for v in adata.obs["cell_type"]])
    np.testing.assert_array_equal(ds.condition_ids["cell_type"], expected_ids)
    assert len(ds.indices("train")) + len(ds.indices("test")) == 60
    assert len(ds.indices("test")) == 15  # 5 of 20 cells of each type
    np.testing.assert_allclose(ds.library_sizes(np.arange(60)), adata.X.toarray().sum(axis=1))


def test_build_dataset_uses_an_existing_split_column(counts_adata):
    adata = counts_adata(n_cells=12, n_genes=5)
    adata.obs["split"] = pd.Categorical(["test" if i % 4 == 0 else "train" for i in range(12)])
    ds = build_dataset(adata, _cfg())
    np.testing.assert_array_equal(ds.indices("test"), [0, 4, 8])


def test_build_dataset_reuses_given_encoders(counts_adata):
    adata = counts_adata(n_cells=12, n_genes=5)
    encoder = LabelEncoder("cell_type", ["type_2", "type_1", "type_0", "type_9"])
    ds = build_dataset(adata, _cfg(), encoders={"cell_type": encoder})
    expected = np.array([2 - int(v[-1]) for v in adata.obs["cell_type"]])
    np.testing.assert_array_equal(ds.condition_ids["cell_type"], expected)


def test_empty_anndata_is_rejected(counts_adata):
    adata = counts_adata(n_cells=10, n_genes=5)
    with pytest.raises(DataError, match=r"mydata: empty dataset \(0 cells x 5 genes\)"):
        build_dataset(adata[:0].copy(), _cfg(), where="mydata")
    with pytest.raises(DataError, match=r"empty dataset \(10 cells x 0 genes\)"):
        build_dataset(adata[:, :0].copy(), _cfg())


def test_duplicate_var_names_are_rejected(counts_adata):
    adata = counts_adata(n_cells=10, n_genes=5)
    adata.var_names = ["a", "b", "a", "c", "c"]
    with pytest.raises(DataError, match=r"duplicate gene ids in var_names, e\.g\. \['a', 'c'\]"):
        build_dataset(adata, _cfg())


def test_zero_count_cells_are_rejected_naming_the_first(counts_adata):
    adata = counts_adata(n_cells=10, n_genes=5)
    x = adata.X.toarray()
    x[[3, 7]] = 0
    adata.X = sp.csr_matrix(x)
    with pytest.raises(DataError, match=r"2 cells have zero counts \(first: cell_3\)") as err:
        build_dataset(adata, _cfg())
    assert "filter_cells" in str(err.value)


def test_explicit_zeros_count_as_empty(counts_adata):
    adata = counts_adata(n_cells=4, n_genes=3)
    x = sp.csr_matrix(adata.X)
    x.data[x.indptr[1] : x.indptr[2]] = 0.0  # cell 1 stores only explicit zeros
    adata.X = x
    with pytest.raises(DataError, match=r"1 cells have zero counts \(first: cell_1\)"):
        build_dataset(adata, _cfg())


def test_invalid_counts_are_rejected(counts_adata):
    adata = counts_adata(n_cells=10, n_genes=5)
    adata.X = adata.X * 0.5
    with pytest.raises(DataError, match="non-integer"):
        build_dataset(adata, _cfg())
    build_dataset(adata, _cfg(allow_non_integer=True))


def test_missing_condition_key_is_rejected(counts_adata):
    adata = counts_adata(n_cells=10, n_genes=5)
    with pytest.raises(DataError, match=r"condition keys \['donor'\] are not obs columns; obs has \['cell_type'\]"):
        build_dataset(adata, _cfg(condition_keys=["cell_type", "donor"]))


def test_bad_split_values_are_rejected(counts_adata):
    adata = counts_adata(n_cells=10, n_genes=5)
    adata.obs["split"] = ["train"] * 5 + ["val"] * 3 + ["TEST"] * 2
    with pytest.raises(DataError, match=r"obs\['split'\] has values \['TEST', 'val'\]; expected train/test"):
        build_dataset(adata, _cfg())


def test_empty_split_is_an_error(counts_adata):
    adata = counts_adata(n_cells=10, n_genes=5)
    adata.obs["split"] = "train"
    ds = build_dataset(adata, _cfg())
    with pytest.raises(DataError, match="the 'test' split is empty"):
        ds.indices("test")


# --- stratified_split ---------------------------------------------------------------------------------


@pytest.mark.parametrize("test_fraction", [0.1, 0.2, 0.37])
def test_stratified_split_fraction_per_label(test_fraction):
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array(["a", "b", "c", "d"]), size=517, p=[0.5, 0.3, 0.15, 0.05])
    split = stratified_split(labels, test_fraction, seed=3)
    assert set(split.tolist()) == {"train", "test"}
    for value in np.unique(labels):
        in_label = labels == value
        n_test = int((split[in_label] == "test").sum())
        assert abs(n_test - test_fraction * in_label.sum()) <= 1, value
        assert (split[in_label] == "train").any()


def test_stratified_split_keeps_a_train_cell_for_tiny_labels():
    labels = np.array(["a"] * 10 + ["b"] + ["c"] * 2)
    split = stratified_split(labels, 0.6, seed=0)
    assert (split[labels == "b"] == "train").all()
    assert (split[labels == "c"] == "train").sum() >= 1


def test_stratified_split_is_deterministic_and_depends_on_the_seed():
    labels = np.repeat(np.array(["x", "y", "z"]), 50)
    a = stratified_split(labels, 0.2, seed=1)
    np.testing.assert_array_equal(a, stratified_split(labels, 0.2, seed=1))
    assert not np.array_equal(a, stratified_split(labels, 0.2, seed=2))


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


def test_dataset_batch_selects_rows(counts_adata):
    adata = counts_adata(n_cells=30, n_genes=12)
    ds = build_dataset(adata, _cfg())
    idx = np.array([3, 10, 29])
    batch = ds.batch(idx)
    np.testing.assert_array_equal(batch.target.numpy(), adata.X[idx].toarray())
    np.testing.assert_array_equal(batch.conditions["cell_type"].numpy(), idx % 3)


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


# --- ShuffledBatches ------------------------------------------------------------------------------------


def _stream(n_items: int = 23, batch_size: int = 5, seed: int = 7) -> ShuffledBatches:
    idx = np.arange(100, 100 + n_items)
    return ShuffledBatches(lambda chunk: chunk.copy(), idx, batch_size, seed)


def test_one_epoch_covers_every_item_at_most_once_dropping_the_last_partial_batch():
    stream = _stream()
    steps_per_epoch = 23 // 5
    epoch = [next(stream) for _ in range(steps_per_epoch)]
    seen = np.concatenate(epoch)
    assert all(len(b) == 5 for b in epoch)
    assert len(np.unique(seen)) == len(seen) == 20
    assert set(seen.tolist()) <= set(range(100, 123))
    assert all(np.all(np.diff(b) > 0) for b in epoch)  # sorted within a batch
    assert stream.epoch == 0
    next(stream)
    assert stream.epoch == 1


def test_divisible_epoch_covers_every_item_exactly_once():
    stream = _stream(n_items=20, batch_size=4)
    seen = np.concatenate([next(stream) for _ in range(5)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(100, 120))


def test_epochs_are_shuffled_differently():
    stream = _stream(n_items=20, batch_size=4)
    first = [next(stream).tolist() for _ in range(5)]
    second = [next(stream).tolist() for _ in range(5)]
    assert first != second
    assert sorted(sum(first, [])) == sorted(sum(second, []))
    other_seed = _stream(n_items=20, batch_size=4, seed=8)
    assert [next(other_seed).tolist() for _ in range(5)] != first


def test_small_set_gives_one_full_batch():
    stream = _stream(n_items=3, batch_size=32)
    np.testing.assert_array_equal(next(stream), [100, 101, 102])
    np.testing.assert_array_equal(next(stream), [100, 101, 102])


def test_state_dict_resumes_the_identical_stream():
    reference = _stream()
    expected = [next(reference) for _ in range(17)]
    stream = _stream()
    for _ in range(6):  # past the end of the first epoch
        next(stream)
    state = stream.state_dict()
    resumed = _stream(seed=99)  # the seed comes from the state
    resumed.load_state_dict(state)
    for want in expected[6:]:
        np.testing.assert_array_equal(next(resumed), want)


def test_batches_are_built_by_batch_fn(counts_adata):
    adata = counts_adata(n_cells=30, n_genes=12)
    ds = build_dataset(adata, _cfg())
    stream = ShuffledBatches(ds.batch, ds.indices("train"), 8, seed=0)
    batch = next(stream)
    assert batch.size == 8
    assert batch.target.shape == (8, 12)


def test_anndata_with_categorical_conditions_and_numeric_labels(counts_adata):
    adata = counts_adata(n_cells=12, n_genes=5)
    adata.obs["batch"] = pd.Categorical(np.arange(12) % 2)
    ds = build_dataset(adata, _cfg(condition_keys=["batch", "cell_type"]))
    assert ds.encoders["batch"].values == ["0", "1"]
    np.testing.assert_array_equal(ds.condition_ids["batch"], np.arange(12) % 2)


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
