"""The in-memory dataset (building it and its errors, its batches) and the shuffled stream."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scldm_scale.config import DataConfig
from scldm_scale.data.batch import LabelEncoder
from scldm_scale.data.counts import DataError
from scldm_scale.data.dataset import ShuffledBatches, build_dataset


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


def test_a_missing_label_is_not_a_class_called_nan(counts_adata):
    adata = counts_adata(n_cells=10, n_genes=5)
    labels = adata.obs["cell_type"].astype(object)
    labels.iloc[4] = None
    adata.obs["cell_type"] = labels
    with pytest.raises(DataError, match=r"label column 'cell_type' has 1 missing values \(first: cell "):
        build_dataset(adata, _cfg())


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


def test_dataset_batch_selects_rows(counts_adata):
    adata = counts_adata(n_cells=30, n_genes=12)
    ds = build_dataset(adata, _cfg())
    idx = np.array([3, 10, 29])
    batch = ds.batch(idx)
    np.testing.assert_array_equal(batch.target.numpy(), adata.X[idx].toarray())
    np.testing.assert_array_equal(batch.conditions["cell_type"].numpy(), idx % 3)


# --- ShuffledBatches ------------------------------------------------------------------------------------


def _stream(n_items: int = 23, batch_size: int = 5, seed: int = 7) -> ShuffledBatches:
    idx = np.arange(100, 100 + n_items)
    return ShuffledBatches(lambda chunk, _epoch: chunk.copy(), idx, batch_size, seed)


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


def _weighted(weights: np.ndarray, seed: int = 7, rank: int | None = None, world_size: int | None = None):
    idx = np.arange(100, 100 + len(weights))
    return ShuffledBatches(lambda chunk, _epoch: chunk.copy(), idx, 5, seed, rank, world_size, weights=weights)


def test_weighted_epochs_draw_items_in_proportion_to_their_weights():
    weights = np.array([8.0] * 2 + [1.0] * 18)  # two items hold 16 / 34 of the mass
    stream = _weighted(weights)
    seen = np.concatenate([next(stream) for _ in range(4 * 500)])  # 500 epochs of 4 batches
    share_heavy = np.isin(seen, [100, 101]).mean()
    assert abs(share_heavy - 16 / 34) < 0.02


def test_zero_weight_items_are_never_drawn_and_bad_weights_are_refused():
    weights = np.ones(20)
    weights[:5] = 0.0
    stream = _weighted(weights)
    seen = np.concatenate([next(stream) for _ in range(40)])
    assert not np.isin(seen, np.arange(100, 105)).any()
    for bad in (np.zeros(20), np.ones(19), -np.ones(20), np.full(20, np.nan)):
        with pytest.raises(ValueError, match="weights must be 20 finite values"):
            ShuffledBatches(lambda chunk, _epoch: chunk, np.arange(20), 5, 0, 0, 1, weights=bad)


def test_weighted_stream_resumes_identically_and_ranks_split_the_global_batch():
    weights = np.linspace(0.1, 3.0, 23)
    reference = _weighted(weights)
    expected = [next(reference) for _ in range(13)]
    stream = _weighted(weights)
    for _ in range(6):
        next(stream)
    resumed = _weighted(weights, seed=99)
    resumed.load_state_dict(stream.state_dict())
    for want in expected[6:]:
        np.testing.assert_array_equal(next(resumed), want)
    # Two ranks of batch 5 draw, between them, the same items as one process of batch 10.
    single = ShuffledBatches(lambda c, _e: c.copy(), np.arange(100, 123), 10, 7, 0, 1, weights=weights)
    ranks = [_weighted(weights, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        together = np.sort(np.concatenate([next(r) for r in ranks]))
        np.testing.assert_array_equal(together, next(single))


def test_batches_are_built_by_batch_fn(counts_adata):
    adata = counts_adata(n_cells=30, n_genes=12)
    ds = build_dataset(adata, _cfg())
    stream = ShuffledBatches(lambda rows, _epoch: ds.batch(rows), ds.indices("train"), 8, seed=0)
    batch = next(stream)
    assert batch.size == 8
    assert batch.target.shape == (8, 12)


def test_anndata_with_categorical_conditions_and_numeric_labels(counts_adata):
    adata = counts_adata(n_cells=12, n_genes=5)
    adata.obs["batch"] = pd.Categorical(np.arange(12) % 2)
    ds = build_dataset(adata, _cfg(condition_keys=["batch", "cell_type"]))
    assert ds.encoders["batch"].values == ["0", "1"]
    np.testing.assert_array_equal(ds.condition_ids["batch"], np.arange(12) % 2)
