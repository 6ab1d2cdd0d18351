"""The report's UMAP from exact neighbours: a real embedding that keeps separated groups apart."""

import numpy as np

from scldm_scale.evaluate.plots import umap_embedding


def test_umap_embedding_keeps_two_clusters_apart():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(60, 10))
    b = rng.normal(8.0, 1.0, size=(60, 10))
    xy = umap_embedding(np.concatenate([a, b]), seed=0)
    assert xy.shape == (120, 2) and np.isfinite(xy).all()
    labels = np.repeat([0, 1], 60)
    # each point's nearest other point in the embedding is from its own cluster
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() == 1.0
    # the clusters' centroids are further apart than either cluster's spread
    spread = max(xy[labels == k].std(0).max() for k in (0, 1))
    assert np.linalg.norm(xy[labels == 0].mean(0) - xy[labels == 1].mean(0)) > 3 * spread


def test_umap_embedding_is_deterministic_for_a_seed():
    x = np.random.default_rng(1).normal(size=(40, 5))
    np.testing.assert_allclose(umap_embedding(x, seed=3), umap_embedding(x, seed=3))
