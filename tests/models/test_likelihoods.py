"""NB and Gaussian observation models against scipy, scanpy and the NB moments."""

import numpy as np
import pytest
import torch
from scipy.stats import nbinom, norm

from scldm_scale.models.likelihoods import (
    LOG_THETA_MAX,
    LOG_THETA_MIN,
    GaussianHead,
    NegativeBinomialHead,
    nb_log_prob,
    sample_nb,
)

COUNTS = np.array([0, 1, 2, 3, 7, 10, 31, 100, 257, 1000, 12345, 50000, 1e5])
MEANS = np.logspace(-3, 5, 17)
THETAS = np.logspace(-2, 3, 11)


def _scipy_nb(x: np.ndarray, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    # scipy's NB(n, p) counts failures before n successes: n = theta, p = theta / (theta + mu) has mean mu.
    return nbinom.logpmf(x, theta, theta / (theta + mu))


def test_nb_log_prob_float64_matches_scipy_over_the_whole_range():
    x, mu, theta = np.meshgrid(COUNTS, MEANS, THETAS, indexing="ij")
    expected = _scipy_nb(x, mu, theta)
    got = nb_log_prob(torch.tensor(x), torch.tensor(np.log(mu)), torch.tensor(np.log(theta))).numpy()
    assert got.dtype == np.float64
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=0)


def test_nb_log_prob_is_a_normalised_distribution():
    x = torch.arange(0, 4000, dtype=torch.float64)
    for mu, theta in [(0.3, 0.05), (5.0, 1.0), (120.0, 20.0)]:
        log_p = nb_log_prob(x, torch.tensor(np.log(mu)), torch.tensor(np.log(theta)))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (x * log_p.exp()).sum().item() == pytest.approx(mu, rel=1e-5)


def test_nb_log_prob_float32_large_counts_is_finite_and_accurate():
    x = np.full(6, 5e4)
    mu = np.array([1.0, 100.0, 5e4, 1e5, 3e4, 5e4])
    theta = np.array([0.1, 1.0, 10.0, 1e3, 1e4, np.exp(LOG_THETA_MAX)])
    got = nb_log_prob(
        torch.tensor(x, dtype=torch.float32),
        torch.tensor(np.log(mu), dtype=torch.float32),
        torch.tensor(np.log(theta), dtype=torch.float32),
    )
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    # float32 holds lgamma(5e4) ~ 4.9e5 with a spacing of 2^-5, so the cancelling lgamma terms carry an
    # absolute error of a few times 0.03 (measured: <= 0.03).
    np.testing.assert_allclose(got.numpy(), _scipy_nb(x, mu, theta), rtol=0, atol=0.15)


def test_nb_log_prob_gradients_are_finite_in_float32_for_large_counts():
    x = torch.tensor([0.0, 5e4, 1e5])
    log_mu = torch.tensor([np.log(1e-3), np.log(5e4), np.log(10.0)], dtype=torch.float32, requires_grad=True)
    log_theta = torch.tensor([LOG_THETA_MIN, 0.0, LOG_THETA_MAX], dtype=torch.float32, requires_grad=True)
    nb_log_prob(x, log_mu, log_theta).sum().backward()
    assert torch.isfinite(log_mu.grad).all() and torch.isfinite(log_theta.grad).all()


def test_nb_log_prob_gradient_in_mu_matches_the_closed_form():
    # d log NB / d log mu = theta (x - mu) / (theta + mu)
    x = torch.tensor([0.0, 3.0, 40.0, 7000.0], dtype=torch.float64)
    mu = torch.tensor([0.5, 3.0, 10.0, 9000.0], dtype=torch.float64)
    theta = torch.tensor([0.2, 2.0, 50.0, 3.0], dtype=torch.float64)
    log_mu = mu.log().requires_grad_()
    nb_log_prob(x, log_mu, theta.log()).sum().backward()
    torch.testing.assert_close(log_mu.grad, theta * (x - mu) / (theta + mu), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("mu", "theta"), [(0.2, 0.5), (4.0, 1.0), (50.0, 3.0), (300.0, 100.0)])
def test_sample_nb_moments(mu, theta):
    torch.manual_seed(0)
    n = 200_000
    samples = sample_nb(torch.full((n,), mu), torch.full((n,), theta)).double()
    assert torch.equal(samples, samples.round()) and (samples >= 0).all()
    variance = mu + mu**2 / theta
    # Standard errors from the sample itself: var/n for the mean, (m4 - s^4)/n for the variance.
    mean_se = (variance / n) ** 0.5
    centred = samples - samples.mean()
    var_se = (((centred**4).mean() - centred.var() ** 2) / n).sqrt().item()
    assert abs(samples.mean().item() - mu) < 5 * mean_se
    assert abs(samples.var().item() - variance) < 5 * var_se


def test_sample_nb_matches_the_scipy_pmf():
    torch.manual_seed(1)
    mu, theta, n = 3.0, 0.7, 100_000
    samples = sample_nb(torch.full((n,), mu), torch.full((n,), theta)).long()
    freq = torch.bincount(samples, minlength=8)[:8].double().numpy() / n
    pmf = nbinom.pmf(np.arange(8), theta, theta / (theta + mu))
    np.testing.assert_allclose(freq, pmf, atol=5 * np.sqrt(pmf * (1 - pmf) / n).max())


def _nb_head(theta_mode: str = "gene", d_model: int = 8, n_genes: int = 11) -> NegativeBinomialHead:
    torch.manual_seed(0)
    head = NegativeBinomialHead(d_model, n_genes, theta_mode)
    with torch.no_grad():
        head.to_logit.weight.normal_(0.0, 1.0)
        if theta_mode == "gene":
            head.log_theta.normal_(0.0, 1.0)
    return head


def _distribution(head, hidden, genes, library):
    return head.distribution(head.per_gene(hidden, genes), library)


def test_nb_head_mean_sums_to_the_library_size():
    head = _nb_head()
    hidden = torch.randn(4, 11, 8)
    library = torch.tensor([1.0, 250.0, 3e3, 4.2e4])
    mu = head.mean(_distribution(head, hidden, torch.arange(11), library), library)
    assert mu.shape == (4, 11)
    torch.testing.assert_close(mu.sum(-1), library, rtol=1e-5, atol=0)
    # The proportions are the softmax of the per-gene logits, the same for every library size.
    logits = (hidden @ head.to_logit.weight.T).squeeze(-1)
    torch.testing.assert_close(mu / library[:, None], torch.softmax(logits, -1), rtol=1e-5, atol=1e-7)


def test_nb_head_log_prob_matches_scipy_with_its_parameters():
    head = _nb_head()
    hidden = torch.randn(3, 11, 8)
    genes = torch.arange(11)
    library = torch.tensor([100.0, 1000.0, 20.0])
    counts = torch.poisson(torch.full((3, 11), 6.0))
    distribution = _distribution(head, hidden, genes, library)
    got = head.log_prob(distribution, library, counts)
    mu = head.mean(distribution, library).double().detach().numpy()
    theta = head.log_theta.exp()[None].expand(3, -1).double().detach().numpy()
    np.testing.assert_allclose(got.detach().numpy(), _scipy_nb(counts.numpy(), mu, theta), rtol=1e-5, atol=1e-5)


def test_nb_head_clamps_theta_and_indexes_the_decoded_genes():
    head = _nb_head()
    with torch.no_grad():
        head.log_theta[0] = 50.0
        head.log_theta[1] = -50.0
    genes = torch.tensor([1, 0, 5])
    _, log_theta = _distribution(head, torch.randn(2, 3, 8), genes, torch.tensor([10.0, 20.0]))
    assert log_theta[0].tolist() == pytest.approx([LOG_THETA_MIN, LOG_THETA_MAX, head.log_theta[5].item()])


def test_nb_head_samples_have_the_head_mean():
    torch.manual_seed(2)
    head = _nb_head()
    hidden = torch.randn(1, 11, 8).expand(20_000, -1, -1)
    library = torch.full((20_000,), 500.0)
    genes = torch.arange(11)
    samples = head.sample(_distribution(head, hidden, genes, library), library)
    mu = head.mean(_distribution(head, hidden[:1], genes, library[:1]), library[:1])[0]
    theta = head.log_theta.exp()
    se = ((mu + mu**2 / theta) / 20_000).sqrt()
    assert ((samples.mean(0) - mu).abs() < 5 * se).all()


def test_gaussian_head_transform_is_normalize_total_then_log1p():
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(6, 9)).astype(np.float64)
    counts[:, 0] += 1
    # scanpy's normalize_total(target_sum=1e4) followed by log1p, written out in float64.
    expected = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    got = GaussianHead.transform(torch.tensor(counts, dtype=torch.float32), torch.tensor(counts.sum(1)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_gaussian_head_log_prob_matches_scipy():
    torch.manual_seed(3)
    head = GaussianHead(8, 5)
    with torch.no_grad():
        head.log_std.normal_()
    hidden = torch.randn(2, 5, 8)
    genes = torch.arange(5)
    counts = torch.poisson(torch.full((2, 5), 4.0))
    library = counts.sum(1).clamp_min(1.0)
    distribution = _distribution(head, hidden, genes, library)
    got = head.log_prob(distribution, library, counts).detach().numpy()
    mean, log_std = distribution
    y = np.log1p(counts.numpy() / library.numpy()[:, None] * 1e4)
    expected = norm.logpdf(y, mean.detach().numpy(), np.exp(log_std.detach().numpy()))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
