"""Metrics against independent references: closed forms, sklearn, scipy, brute force and hand computations."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.linalg import sqrtm as scipy_sqrtm
from scipy.spatial.distance import cdist, pdist
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.metrics import r2_score

from scldm_scale.evaluate import metrics
from scldm_scale.evaluate.metrics import (
    PCAProjector,
    classifier_two_sample_accuracy,
    dropout_mae,
    frechet_distance,
    highly_variable_genes,
    mean_var_r2,
    mmd_rbf,
    moment_agreement,
    normalize_log1p,
    one_nn_accuracy,
    pearson,
    precision_recall_knn,
    r2,
    wasserstein2,
)


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


# ---- shared input validation -------------------------------------------------------------------------------

POINT_CLOUD_METRICS = [
    mmd_rbf,
    wasserstein2,
    frechet_distance,
    one_nn_accuracy,
    classifier_two_sample_accuracy,
    precision_recall_knn,
]


@pytest.mark.parametrize("metric", POINT_CLOUD_METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((3, 2)), np.zeros((3, 4)), "equal d"),
        (np.zeros(3), np.zeros((3, 1)), "equal d"),
        (np.zeros((0, 2)), np.zeros((3, 2)), "non-empty"),
        (np.array([[0.0, np.nan]] * 3), np.zeros((3, 2)), "finite"),
        (np.zeros((3, 2)), np.array([[np.inf, 0.0]] * 3), "finite"),
    ],
)
def test_point_cloud_metrics_reject_bad_inputs_by_name(metric, x, y, message):
    with pytest.raises(ValueError, match=f"{metric.__name__}.*{message}"):
        metric(x, y)


# ---- wasserstein2 ------------------------------------------------------------------------------------------


def _w2_1d_by_quantiles(a: np.ndarray, b: np.ndarray) -> float:
    """W2 of two 1-D empirical distributions as sqrt(∫₀¹ (F⁻¹(t) - G⁻¹(t))² dt); the quantile functions
    are steps at i/n and j/m, so the integral is a sum over the merged breakpoints."""
    a, b = np.sort(a), np.sort(b)
    breaks = np.union1d(np.arange(len(a) + 1) / len(a), np.arange(len(b) + 1) / len(b))
    mids = (breaks[:-1] + breaks[1:]) / 2
    steps = a[(mids * len(a)).astype(int)] - b[(mids * len(b)).astype(int)]
    return float(np.sqrt((np.diff(breaks) * steps**2).sum()))


def test_wasserstein2_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(10).normal(size=(120, 4))
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-6)
    assert wasserstein2(x, x[::-1].copy()) == pytest.approx(0.0, abs=1e-6)


def test_wasserstein2_of_a_translated_set_is_the_translation_length():
    # For any coupling with uniform marginals, sum P_ij (x_i - x_j) = 0, so the cost of x against x + v
    # is W2²(x, x) + ||v||² = ||v||², reached by the identity coupling.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(100, 3))
    v = np.array([0.3, -1.2, 2.0])
    shifted = (x + v)[rng.permutation(100)]
    assert wasserstein2(x, shifted) == pytest.approx(np.linalg.norm(v), rel=1e-9)


def test_wasserstein2_in_1d_matches_the_quantile_formula():
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=80), rng.gamma(2.0, 1.0, size=80)
    # Equal sizes: W2² = mean((sort(x) - sort(y))²).
    expected = np.sqrt(np.mean((np.sort(x) - np.sort(y)) ** 2))
    assert wasserstein2(x[:, None], y[:, None]) == pytest.approx(expected, rel=1e-9)
    assert _w2_1d_by_quantiles(x, y) == pytest.approx(expected, rel=1e-12)
    # Unequal sizes: the general quantile integral.
    z = rng.exponential(size=53)
    assert wasserstein2(x[:, None], z[:, None]) == pytest.approx(_w2_1d_by_quantiles(x, z), rel=1e-9)


def test_wasserstein2_subsamples_each_side_with_the_seed():
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(300, 2)), rng.normal(1.0, 1.0, size=(250, 2))
    pick = np.random.default_rng(7)
    x_rows = np.sort(pick.choice(300, 100, replace=False))
    y_rows = np.sort(pick.choice(250, 100, replace=False))
    assert wasserstein2(x, y, max_cells=100, seed=7) == pytest.approx(
        wasserstein2(x[x_rows], y[y_rows], max_cells=100), rel=1e-12
    )
    assert wasserstein2(x, y, max_cells=100, seed=7) != wasserstein2(x, y, max_cells=100, seed=8)
    assert wasserstein2(x, y, max_cells=300, seed=1) == wasserstein2(x, y, max_cells=300, seed=2)


# ---- frechet_distance --------------------------------------------------------------------------------------


def _with_sample_moments(rng: np.random.Generator, n: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """n points whose sample mean is exactly `mean` and sample covariance (ddof=1) exactly diag(std²)."""
    centred = rng.normal(size=(n, len(mean)))
    centred -= centred.mean(axis=0)
    orthonormal, _ = np.linalg.qr(centred)  # columns stay orthogonal to the all-ones vector
    return mean + np.sqrt(n - 1) * orthonormal * std


def _frechet_by_eigh(x: np.ndarray, y: np.ndarray) -> float:
    """Tr((Σx Σy)^{1/2}) = Tr((Σx^{1/2} Σy Σx^{1/2})^{1/2}), a symmetric PSD matrix, so eigh suffices."""
    cov_x, cov_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    values, vectors = np.linalg.eigh(cov_x)
    sqrt_x = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_x @ cov_y @ sqrt_x), 0, None)).sum()
    diff = x.mean(axis=0) - y.mean(axis=0)
    return float(diff @ diff + np.trace(cov_x) + np.trace(cov_y) - 2 * cross)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(14).normal(size=(200, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_for_diagonal_covariances_is_mean_and_std_gaps():
    rng = np.random.default_rng(15)
    mean_x, std_x = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 0.5, 2.0, 3.0])
    mean_y, std_y = np.array([1.0, 1.0, 0.0, -0.5]), np.array([2.0, 0.5, 1.0, 0.1])
    x = _with_sample_moments(rng, 150, mean_x, std_x)
    y = _with_sample_moments(rng, 90, mean_y, std_y)
    np.testing.assert_allclose(np.cov(x, rowvar=False), np.diag(std_x**2), atol=1e-10)
    expected = ((mean_x - mean_y) ** 2).sum() + ((std_x - std_y) ** 2).sum()
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_the_symmetric_form_on_correlated_samples():
    rng = np.random.default_rng(16)
    mixing_x, mixing_y = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    x = rng.normal(size=(300, 5)) @ mixing_x + 1.0
    y = rng.normal(size=(200, 5)) @ mixing_y
    assert frechet_distance(x, y) == pytest.approx(_frechet_by_eigh(x, y), rel=1e-8)
    # In 1-D it is the squared W2 of two Gaussians: (μx - μy)² + (σx - σy)².
    a, b = x[:, :1], y[:, :1]
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_retries_a_non_finite_square_root_with_eps(monkeypatch):
    calls = []

    def sqrtm_failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else scipy_sqrtm(matrix)

    monkeypatch.setattr(metrics, "sqrtm", sqrtm_failing_once)
    rng = np.random.default_rng(17)
    x, y = rng.normal(size=(100, 3)), rng.normal(0.5, 2.0, size=(120, 3))
    with pytest.warns(RuntimeWarning, match="frechet_distance.*not finite"):
        value = frechet_distance(x, y)
    assert len(calls) == 2
    assert value == pytest.approx(_frechet_by_eigh(x, y), abs=1e-4)


def test_frechet_distance_needs_two_rows_per_side():
    with pytest.raises(ValueError, match="frechet_distance needs at least 2 rows"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ---- moment_agreement, dropout_mae ------------------------------------------------------------------------


def test_moment_agreement_against_sklearn_and_scipy_dense_and_sparse():
    rng = np.random.default_rng(18)
    real = normalize_log1p(rng.poisson(rng.gamma(2.0, 2.0, size=40), size=(120, 40)))
    generated = normalize_log1p(rng.poisson(rng.gamma(2.0, 2.0, size=40), size=(90, 40)))
    expected = {
        "mean_r2": r2_score(real.mean(0), generated.mean(0)),
        "var_r2": r2_score(real.var(0), generated.var(0)),
        "mean_pearson": pearsonr(real.mean(0), generated.mean(0)).statistic,
        "var_pearson": pearsonr(real.var(0), generated.var(0)).statistic,
    }
    for real_given, generated_given in [(real, generated), (sp.csr_matrix(real), sp.csc_array(generated))]:
        result = moment_agreement(real_given, generated_given)
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, rel=1e-10), key


def test_moment_agreement_is_one_for_identical_matrices():
    x = np.random.default_rng(19).gamma(2.0, 1.0, size=(50, 20))
    assert moment_agreement(x, x.copy()) == pytest.approx(
        {"mean_r2": 1.0, "var_r2": 1.0, "mean_pearson": 1.0, "var_pearson": 1.0}, rel=1e-12
    )


def test_moment_agreement_rejects_gene_mismatch_and_nan():
    with pytest.raises(ValueError, match="moment_agreement: gene counts differ"):
        moment_agreement(np.ones((4, 3)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="moment_agreement needs finite"):
        moment_agreement(sp.csr_matrix([[np.nan, 1.0]]), np.ones((4, 2)))


def test_dropout_mae_by_hand_dense_and_sparse():
    real = np.array([[0, 1], [0, 2], [3, 0], [0, 0]])  # zero fractions 3/4 and 1/2
    generated = np.array([[1, 1], [0, 0]])  # zero fractions 1/2 and 1/2
    assert dropout_mae(real, generated) == pytest.approx(0.125, rel=1e-12)
    # An explicitly stored zero still counts as a zero.
    stored_zero = sp.csr_matrix((np.array([1.0, 1.0, 0.0]), np.array([0, 1, 0]), np.array([0, 2, 3])), shape=(2, 2))
    assert stored_zero.nnz == 3
    np.testing.assert_array_equal(stored_zero.toarray(), generated)
    assert dropout_mae(sp.csr_matrix(real), stored_zero) == pytest.approx(0.125, rel=1e-12)
    assert dropout_mae(real, real) == 0.0
    assert dropout_mae(np.zeros((3, 4)), np.ones((2, 4))) == 1.0
    with pytest.raises(ValueError, match="dropout_mae: gene counts differ"):
        dropout_mae(real, np.ones((2, 3)))


# ---- one_nn_accuracy, highly_variable_genes ---------------------------------------------------------------


def test_one_nn_accuracy_matches_a_brute_force_leave_one_out():
    rng = np.random.default_rng(20)
    x, y = rng.normal(size=(30, 3)), rng.normal(0.7, 1.0, size=(30, 3))
    pooled, labels = np.concatenate([x, y]), np.repeat([0, 1], 30)
    distances = cdist(pooled, pooled)
    np.fill_diagonal(distances, np.inf)
    expected = (labels[distances.argmin(axis=1)] == labels).mean()
    assert one_nn_accuracy(x, y) == pytest.approx(expected, abs=0)


def test_one_nn_accuracy_far_apart_sets_are_perfectly_separable():
    rng = np.random.default_rng(21)
    assert one_nn_accuracy(rng.normal(size=(100, 4)), rng.normal(50.0, 1.0, size=(80, 4))) == 1.0


def test_one_nn_accuracy_of_an_exact_copy_is_zero():
    # Each point's nearest other point is its copy at distance 0, always from the other set: a perfect
    # memoriser scores 0, not 0.5.
    x = np.random.default_rng(22).normal(size=(200, 5))
    assert one_nn_accuracy(x, x.copy()) == 0.0


def test_one_nn_accuracy_of_two_samples_of_one_gaussian_is_near_a_half():
    rng = np.random.default_rng(23)
    assert abs(one_nn_accuracy(rng.normal(size=(400, 5)), rng.normal(size=(400, 5))) - 0.5) < 0.08
    # Balancing: unbalanced, the 1000-point set would be labelled right ~90% of the time by majority alone.
    many, few = rng.normal(size=(1000, 5)), rng.normal(size=(100, 5))
    accuracy = one_nn_accuracy(many, few, seed=3)
    assert abs(accuracy - 0.5) < 0.1
    assert one_nn_accuracy(many, few, seed=3) == accuracy


def _planted_lognorm(n_cells: int = 200, n_genes: int = 600, seed: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Poisson genes with means spread over 0.5..20, except 5 planted gamma-Poisson (shape 0.1) ones, whose
    variance mean + 10 mean² is far above any Poisson gene's. Seurat z-scores dispersion within 20 bins
    of mean expression, and a gene's z in a bin of b genes is at most (b - 1) / sqrt(b), so the planted
    means are spread log-evenly (one per bin) and there are enough genes for ~30 per bin."""
    rng = np.random.default_rng(seed)
    means = np.exp(rng.uniform(np.log(0.5), np.log(20.0), n_genes))
    planted = np.sort(rng.choice(n_genes, 5, replace=False))
    means[planted] = np.geomspace(0.8, 12.0, 5)
    counts = rng.poisson(means, size=(n_cells, n_genes))
    counts[:, planted] = rng.poisson(rng.gamma(0.1, means[planted] / 0.1, size=(n_cells, len(planted))))
    return normalize_log1p(counts), planted


def test_highly_variable_genes_finds_the_planted_ones():
    x, planted = _planted_lognorm()
    np.testing.assert_array_equal(highly_variable_genes(x, n_top=5), planted)
    np.testing.assert_array_equal(highly_variable_genes(sp.csr_matrix(x), n_top=5), planted)
    assert set(planted) <= set(highly_variable_genes(x, n_top=12))
    np.testing.assert_array_equal(highly_variable_genes(x), np.arange(600))  # 2000 capped at 600
    np.testing.assert_array_equal(highly_variable_genes(x, n_top=600), np.arange(600))  # capped


# ---- classifier_two_sample_accuracy -----------------------------------------------------------------------


def test_c2st_of_one_distribution_is_near_a_half():
    rng = np.random.default_rng(25)
    accuracy = classifier_two_sample_accuracy(rng.normal(size=(500, 10)), rng.normal(size=(600, 10)))
    assert abs(accuracy - 0.5) < 0.1


def test_c2st_separates_shifted_sets_and_sees_a_variance_change():
    rng = np.random.default_rng(26)
    x = rng.normal(size=(500, 10))
    assert classifier_two_sample_accuracy(x, rng.normal(size=(500, 10)) + 3.0) > 0.95
    # Same means, one coordinate 3x wider: a linear classifier stays at 0.5, the Bayes rule reaches ~0.72.
    wider = rng.normal(size=(500, 10)) * np.r_[3.0, np.ones(9)]
    assert classifier_two_sample_accuracy(x, wider) > 0.62


def test_c2st_is_deterministic_under_its_seed_and_checks_folds():
    rng = np.random.default_rng(27)
    x, y = rng.normal(size=(200, 4)), rng.normal(0.3, 1.0, size=(300, 4))
    assert classifier_two_sample_accuracy(x, y, seed=1) == classifier_two_sample_accuracy(x, y, seed=1)
    with pytest.raises(ValueError, match="classifier_two_sample_accuracy needs 2 <= n_folds"):
        classifier_two_sample_accuracy(x[:3], y, n_folds=5)


# ---- precision_recall_knn ---------------------------------------------------------------------------------


def test_precision_recall_knn_of_identical_sets_is_all_one():
    x = np.random.default_rng(28).normal(size=(150, 4))
    result = precision_recall_knn(x, x.copy(), k=5)
    assert result == pytest.approx({"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}, rel=1e-12)


def test_precision_recall_knn_of_far_apart_sets_is_all_zero():
    rng = np.random.default_rng(29)
    result = precision_recall_knn(rng.normal(size=(60, 3)), rng.normal(100.0, 1.0, size=(70, 3)), k=3)
    assert result == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_precision_recall_knn_by_hand_in_1d():
    # k = 1. Real radii (nearest other real point): 1, 1, 1, 1. Generated radii: 9.5, 9.5.
    # precision: 0.5 is within 1 of real 0 and 1; 10 is 7 from the nearest real ball centre → 1/2.
    # recall: every real point lies within 9.5 of the generated 0.5 → 1.
    # density: 0.5 is inside the balls of real 0 and 1 (2), 10 inside none (0) → (2 + 0) / (1 · 2) = 1.
    # coverage: real 0 and 1 have a generated point closer than 1, real 2 and 3 do not → 1/2.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    generated = np.array([[0.5], [10.0]])
    result = precision_recall_knn(real, generated, k=1)
    assert result == pytest.approx({"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}, abs=1e-12)


def test_precision_recall_knn_needs_k_below_the_row_counts():
    with pytest.raises(ValueError, match="precision_recall_knn needs k <"):
        precision_recall_knn(np.zeros((10, 2)), np.ones((5, 2)), k=5)
