"""Metrics against independent references: closed-form MMD, sklearn, scipy and hand computations."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.metrics import r2_score

from scldm_scale.evaluate.metrics import PCAProjector, mean_var_r2, mmd_rbf, normalize_log1p, pearson, r2


def test_mmd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 5))
    assert abs(mmd_rbf(x, x)) < 1e-12
    assert abs(mmd_rbf(x, x[::-1].copy())) < 1e-12


def test_mmd_is_symmetric():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(150, 4)), rng.normal(0.5, 1.0, size=(170, 4))
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(y, x), rel=1e-12)


def test_mmd_matches_closed_form_for_two_gaussians():
    # x ~ N(mu1, s^2 I_d), y ~ N(mu2, s^2 I_d). A difference of two independent draws is
    # N(delta, 2 s^2 I_d), and per dimension E exp(-z^2 / (2 sigma^2)) for z ~ N(delta, tau^2) is
    # sqrt(sigma^2 / (sigma^2 + tau^2)) exp(-delta^2 / (2 (sigma^2 + tau^2))). With tau^2 = 2 s^2:
    # E k(x, x') = E k(y, y') = c := (sigma^2 / (sigma^2 + 2 s^2))^(d/2),
    # E k(x, y) = c exp(-||mu1 - mu2||^2 / (2 (sigma^2 + 2 s^2))), so MMD^2 = 2 c (1 - exp(...)).
    s, sigma, d, n = 1.0, 1.0, 2, 3000
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0])
    c = (sigma**2 / (sigma**2 + 2 * s**2)) ** (d / 2)
    population = 2 * c * (1 - np.exp(-((mu1 - mu2) @ (mu1 - mu2)) / (2 * (sigma**2 + 2 * s**2))))
    # The V-statistic's within-set means include the n diagonal ones: E = c + (1 - c) / n per set.
    expected = population + 2 * (1 - c) / n

    rng = np.random.default_rng(0)
    x = rng.normal(mu1, s, size=(n, d))
    y = rng.normal(mu2, s, size=(n, d))
    # Sampling noise dominates the bias (4e-4): the estimate's sd at n = 3000 is about 0.006 (measured
    # over 20 seeds), so 0.03 is ~5 sd around a population value of ~0.102.
    assert mmd_rbf(x, y, bandwidths=[sigma]) == pytest.approx(expected, abs=0.03)


def test_mmd_grows_with_the_shift():
    rng = np.random.default_rng(2)
    x, noise = rng.normal(size=(300, 3)), rng.normal(size=(300, 3))
    values = [mmd_rbf(x, noise + shift) for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert np.all(np.diff(values) > 0)


def test_mmd_default_bandwidths_are_median_multiples_and_averaged():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(60, 3)), rng.normal(1.0, 2.0, size=(40, 3))
    median = np.median(pdist(np.concatenate([x, y])))
    multiples = [0.25, 0.5, 1.0, 2.0, 4.0]
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(x, y, bandwidths=[median * m for m in multiples]), rel=1e-12)
    single = [mmd_rbf(x, y, bandwidths=[median * m]) for m in multiples]
    assert mmd_rbf(x, y) == pytest.approx(np.mean(single), rel=1e-12)


def test_mmd_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="equal d"):
        mmd_rbf(np.zeros((3, 2)), np.zeros((3, 4)))


def test_r2_matches_sklearn():
    rng = np.random.default_rng(4)
    y_true = rng.normal(size=100)
    y_pred = y_true + rng.normal(0, 0.5, size=100)
    assert r2(y_true, y_pred) == pytest.approx(r2_score(y_true, y_pred), rel=1e-12)
    assert r2(y_true, y_true[::-1]) == pytest.approx(r2_score(y_true, y_true[::-1]), rel=1e-12)


def test_mean_var_r2_is_one_for_identical_matrices():
    x = np.random.default_rng(5).gamma(2.0, 1.0, size=(50, 20))
    assert mean_var_r2(x, x.copy()) == {"mean_r2": 1.0, "var_r2": 1.0}


def test_mean_var_r2_against_sklearn():
    rng = np.random.default_rng(6)
    real, generated = rng.gamma(2.0, 1.0, size=(80, 30)), rng.gamma(2.2, 1.0, size=(90, 30))
    result = mean_var_r2(real, sp.csr_matrix(generated))
    assert result["mean_r2"] == pytest.approx(r2_score(real.mean(0), generated.mean(0)), rel=1e-12)
    assert result["var_r2"] == pytest.approx(r2_score(real.var(0), generated.var(0)), rel=1e-12)


def test_pearson_matches_scipy():
    rng = np.random.default_rng(7)
    x = rng.normal(size=200)
    y = 0.3 * x + rng.normal(size=200)
    assert pearson(x, y) == pytest.approx(pearsonr(x, y).statistic, rel=1e-12)


def test_normalize_log1p_by_hand_with_an_empty_row():
    counts = np.array([[1, 3, 0], [0, 0, 0], [5, 0, 5]])
    expected = np.array(
        [
            [np.log(1 + 1 / 4 * 1e4), np.log(1 + 3 / 4 * 1e4), 0.0],
            [0.0, 0.0, 0.0],
            [np.log(1 + 5 / 10 * 1e4), 0.0, np.log(1 + 5 / 10 * 1e4)],
        ]
    )
    for given in (counts, sp.csr_matrix(counts)):
        out = normalize_log1p(given)
        assert out.dtype == np.float64 and isinstance(out, np.ndarray)
        np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_allclose(normalize_log1p(counts, target_sum=4)[0], np.log1p([1, 3, 0]), rtol=1e-12)


def test_pca_projector_matches_sklearn_and_caps_components():
    rng = np.random.default_rng(8)
    train = normalize_log1p(rng.poisson(2.0, size=(100, 40)))
    other = normalize_log1p(rng.poisson(2.0, size=(25, 40)))

    projector = PCAProjector().fit(train, n_components=10)
    reference = PCA(n_components=10, svd_solver="full", random_state=0).fit_transform(train)
    np.testing.assert_allclose(projector.transform(train), reference, atol=1e-10)
    assert projector.transform(other).shape == (25, 10)

    small = PCAProjector().fit(train[:8], n_components=30)
    assert small.transform(other).shape == (25, 7)


def test_pca_projector_transform_before_fit_raises():
    with pytest.raises(RuntimeError, match="before fit"):
        PCAProjector().transform(np.zeros((2, 3)))
