"""IndependentNB recovers known negative-binomial parameters and samples from them."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from scldm_scale.evaluate.baselines import IndependentNB

N_PER_LABEL = 20_000
# Two labels × five genes; the last gene is all zeros in both.
MEANS = {"B cell": np.array([2.0, 5.0, 10.0, 20.0, 0.0]), "T cell": np.array([10.0, 1.0, 30.0, 5.0, 0.0])}
THETAS = {"B cell": np.array([0.5, 2.0, 10.0, 2.0, 1.0]), "T cell": np.array([2.0, 0.5, 2.0, 10.0, 1.0])}


@pytest.fixture(scope="module")
def nb_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    counts, labels = [], []
    for label, mean in MEANS.items():
        theta = THETAS[label]
        # scipy's nbinom(n, p) has mean n (1 - p) / p: n = θ, p = θ / (θ + m) gives mean m, var m + m²/θ.
        counts.append(stats.nbinom.rvs(theta, theta / (theta + mean), size=(N_PER_LABEL, 5), random_state=rng))
        labels += [label] * N_PER_LABEL
    return np.concatenate(counts), np.array(labels)


def test_fit_recovers_means_and_thetas(nb_data):
    counts, labels = nb_data
    model = IndependentNB().fit(sp.csr_matrix(counts), labels)
    assert model.labels_ == ["B cell", "T cell"]
    for k, label in enumerate(model.labels_):
        mean, theta = MEANS[label], THETAS[label]
        # The sample mean's standard error is sqrt((m + m²/θ) / n): up to 1.2% of m for m = 1, θ = 0.5,
        # so a flat 2% would be under 2 SE there; 4 SE keeps the check honest for every gene.
        standard_error = np.sqrt((mean + mean**2 / theta) / N_PER_LABEL)
        np.testing.assert_array_less(np.abs(model.mean_[k] - mean), 4 * standard_error + 1e-12)
        # Method-of-moments θ has a relative sd of 1–3% here (measured over 10 seeds); 15% is ≥ 5 sd.
        np.testing.assert_allclose(model.theta_[k, :4], theta[:4], rtol=0.15)


def test_dense_and_sparse_fits_agree(nb_data):
    counts, labels = nb_data
    dense = IndependentNB().fit(counts, labels)
    sparse = IndependentNB().fit(sp.csr_matrix(counts), labels)
    np.testing.assert_allclose(sparse.mean_, dense.mean_, rtol=1e-12)
    np.testing.assert_allclose(sparse.theta_[:, :4], dense.theta_[:, :4], rtol=1e-8)


def test_sample_reproduces_per_label_moments(nb_data):
    counts, labels = nb_data
    model = IndependentNB().fit(counts, labels)
    requested = np.array(["T cell", "B cell"] * N_PER_LABEL)
    samples = model.sample(requested, seed=1)
    assert samples.shape == (2 * N_PER_LABEL, 5) and samples.dtype == np.int64
    for k, label in enumerate(model.labels_):
        drawn = samples[requested == label]
        mean, theta = model.mean_[k], model.theta_[k]
        variance = mean + mean**2 / theta
        # Means: 4 standard errors. Variances: the NB sample variance has a relative sd of at most ~3%
        # at θ = 0.5 (excess kurtosis ≈ 6/θ), so 12% is ~4 sd.
        np.testing.assert_array_less(np.abs(drawn.mean(0) - mean), 4 * np.sqrt(variance / N_PER_LABEL) + 1e-12)
        np.testing.assert_allclose(drawn[:, :4].var(0, ddof=1), variance[:4], rtol=0.12)
        assert np.all(drawn[:, 4] == 0)


def test_underdispersed_gene_falls_back_to_poisson():
    counts = np.full((100, 2), 3)
    counts[:, 1] = 0
    model = IndependentNB().fit(counts, ["a"] * 100)
    assert np.isinf(model.theta_[0, 0])
    drawn = model.sample(["a"] * 20_000, seed=0)
    # Poisson(3): mean and variance both 3; the sd of the sample mean is 0.012 and of the variance ~0.03.
    assert drawn[:, 0].mean() == pytest.approx(3.0, abs=0.05)
    assert drawn[:, 0].var(ddof=1) == pytest.approx(3.0, abs=0.2)
    assert np.all(drawn[:, 1] == 0)


def test_sample_is_deterministic_under_a_seed(nb_data):
    counts, labels = nb_data
    model = IndependentNB().fit(counts, labels)
    requested = ["B cell", "T cell", "B cell"] * 10
    np.testing.assert_array_equal(model.sample(requested, seed=7), model.sample(requested, seed=7))
    assert not np.array_equal(model.sample(requested, seed=7), model.sample(requested, seed=8))


def test_unknown_label_names_it_and_the_known_ones(nb_data):
    counts, labels = nb_data
    model = IndependentNB().fit(counts, labels)
    with pytest.raises(ValueError, match=r"'NK cell'.*'B cell', 'T cell'"):
        model.sample(["B cell", "NK cell"], seed=0)


def test_fit_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="one entry per cell"):
        IndependentNB().fit(np.zeros((4, 2)), ["a", "b"])
