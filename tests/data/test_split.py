"""The stratified train / val / test split."""

import numpy as np
import pytest

from scldm_scale.data.split import stratified_split


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


def test_three_way_split_keeps_both_fractions_within_every_label():
    labels = np.repeat(np.array(["a", "b", "c"]), [200, 60, 3])
    split = stratified_split(labels, 0.1, seed=0, val_fraction=0.2)
    for value, n in (("a", 200), ("b", 60)):
        in_label = split[labels == value]
        assert abs((in_label == "test").sum() - 0.1 * n) <= 1 and abs((in_label == "val").sum() - 0.2 * n) <= 1
    assert (split[labels == "c"] == "train").sum() >= 1  # a tiny label keeps a train cell


def test_a_zero_val_fraction_gives_the_two_way_split():
    labels = np.random.default_rng(1).choice(np.array(["x", "y"]), size=101)
    two_way = stratified_split(labels, 0.25, seed=4)
    assert "val" not in set(two_way.tolist())
    # The val cells come after the test cells of each label's permutation: the test cells do not move.
    three_way = stratified_split(labels, 0.25, seed=4, val_fraction=0.3)
    np.testing.assert_array_equal(three_way == "test", two_way == "test")
