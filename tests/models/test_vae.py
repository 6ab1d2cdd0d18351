"""SetVAE: shapes, set symmetries, the padding mask, every latent/input/likelihood mode and gradient flow."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scldm_scale.config import VAEConfig
from scldm_scale.data.batch import CellBatch, collate
from scldm_scale.models.vae import SetVAE

N_GENES = 30


def _vae(**kwargs) -> SetVAE:
    base = dict(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8, mlp_ratio=2.0)
    return SetVAE(VAEConfig(**{**base, **kwargs}), N_GENES)


def _batch(n_cells: int = 6, seed: int = 0, never_expressed: tuple[int, ...] = ()) -> CellBatch:
    """Ragged cells (different numbers of expressed genes) over N_GENES genes."""
    rng = np.random.default_rng(seed)
    dense = rng.poisson(3.0, size=(n_cells, N_GENES)).astype(np.float32)
    dense *= rng.random((n_cells, N_GENES)) < np.linspace(0.15, 0.9, n_cells)[:, None]
    dense[:, 1] += 1  # no empty cells
    dense[:, list(never_expressed)] = 0
    return collate(sp.csr_matrix(dense), {})


def _randomise(vae: SetVAE, seed: int) -> None:
    """Weights far from the 0.02-std init so that differences are not hidden by near-zero activations."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if p.ndim == 1 else 0.0))


def test_shapes():
    torch.manual_seed(0)
    vae = _vae()
    batch = _batch()
    z, kl = vae.encode(batch.gene_ids, batch.counts, batch.mask)
    assert z.shape == (6, 4, 8) == (6, *vae.latent_shape)
    assert kl is None
    hidden = vae.decode(z, batch.decode_gene_ids)
    assert hidden.shape == (6, N_GENES, 16)
    log_prob = vae.log_prob(z, batch.decode_gene_ids, batch.library_size, batch.target)
    assert log_prob.shape == (6, N_GENES)
    counts = vae.sample_counts(z, batch.decode_gene_ids, batch.library_size)
    assert counts.shape == (6, N_GENES)
    assert (counts >= 0).all() and torch.equal(counts, counts.round())


def test_layernorm_latent_is_normalised_per_token():
    torch.manual_seed(0)
    vae = _vae()
    _randomise(vae, 0)  # pre-norm variance >> LayerNorm's eps
    batch = _batch()
    z, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask)
    torch.testing.assert_close(z.mean(-1), torch.zeros(6, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(6, 4), rtol=0, atol=1e-3)


@pytest.mark.parametrize("input_embedding", ["scale", "concat"])
def test_encoder_is_invariant_to_gene_order(input_embedding):
    torch.manual_seed(0)
    vae = _vae(input_embedding=input_embedding)
    _randomise(vae, 1)
    batch = _batch()
    z, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask)
    generator = torch.Generator().manual_seed(2)
    perm = torch.stack([torch.randperm(batch.mask.shape[1], generator=generator) for _ in range(batch.size)])
    z_perm, _ = vae.encode(batch.gene_ids.gather(1, perm), batch.counts.gather(1, perm), batch.mask.gather(1, perm))
    torch.testing.assert_close(z_perm, z, rtol=0, atol=1e-5)


def test_decoder_is_equivariant_to_the_order_of_decoded_genes():
    torch.manual_seed(0)
    vae = _vae()
    _randomise(vae, 3)
    z = torch.randn(3, 4, 8)
    genes = torch.arange(N_GENES)
    perm = torch.randperm(N_GENES)
    hidden = vae.decode(z, genes)
    torch.testing.assert_close(vae.decode(z, genes[perm]), hidden[:, perm], rtol=0, atol=1e-5)


def test_decoding_a_subset_of_genes_gives_the_same_rows():
    torch.manual_seed(0)
    vae = _vae()
    _randomise(vae, 4)
    batch = _batch()
    z, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask)
    subset = torch.tensor([17, 3, 29, 0])
    hidden = vae.decode(z, subset)
    assert hidden.shape == (6, 4, 16)
    torch.testing.assert_close(hidden, vae.decode(z, torch.arange(N_GENES))[:, subset], rtol=0, atol=1e-5)
    log_prob = vae.log_prob(z, subset, batch.library_size, batch.target[:, subset])
    assert log_prob.shape == (6, 4) and torch.isfinite(log_prob).all()


@pytest.mark.parametrize("input_embedding", ["scale", "concat"])
def test_padding_mask_makes_the_latent_independent_of_the_batch(input_embedding):
    torch.manual_seed(0)
    vae = _vae(input_embedding=input_embedding)
    _randomise(vae, 5)
    batch = _batch()
    lengths = batch.mask.sum(1)
    short = int(lengths.argmin())
    assert lengths[short] < batch.mask.shape[1]  # the cell really is padded in the batch
    z_batch, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask)
    n = int(lengths[short])
    z_alone, _ = vae.encode(
        batch.gene_ids[short : short + 1, :n], batch.counts[short : short + 1, :n], batch.mask[short : short + 1, :n]
    )
    torch.testing.assert_close(z_batch[short], z_alone[0], rtol=0, atol=1e-5)
    # Without the mask the padding tokens take part in the pooling and the latent moves.
    z_unmasked, _ = vae.encode(batch.gene_ids, batch.counts, torch.ones_like(batch.mask))
    assert (z_unmasked[short] - z_alone[0]).abs().max() > 1e-2


def test_padding_gets_no_gradient():
    # Separate encoder/decoder tables and the concat embedding: a padding token (gene id 0, count 0)
    # carries a nonzero input vector, so only the mask keeps the never-expressed gene 0 out of the
    # encoder's gradient.
    torch.manual_seed(0)
    vae = _vae(input_embedding="concat", share_gene_embedding=False)
    batch = _batch(never_expressed=(0, 7))
    loss, _ = vae(batch)
    loss.backward()
    grad = vae.gene_embedding.weight.grad
    expressed = torch.zeros(N_GENES, dtype=torch.bool)
    expressed[batch.gene_ids[batch.mask]] = True
    assert not expressed[0] and not expressed[7]
    assert (grad[~expressed] == 0).all()
    assert (grad[expressed].abs().sum(-1) > 0).all()
    assert (vae.decoder_gene_embedding.weight.grad.abs().sum(-1) > 0).all()  # the decoder sees every gene


def test_gaussian_latent_kl_matches_torch_distributions_and_is_nonnegative():
    torch.manual_seed(0)
    vae = _vae(latent_mode="gaussian")
    _randomise(vae, 6)
    batch = _batch()
    raw = {}
    vae.to_latent.register_forward_hook(lambda module, args, out: raw.setdefault("out", out.detach()))
    z_mean, kl = vae.encode(batch.gene_ids, batch.counts, batch.mask, sample=False)
    mean, log_var = raw["out"].double().chunk(2, dim=-1)
    log_var = log_var.clamp(-20.0, 10.0)
    posterior = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(dim=(1, 2))
    assert kl.shape == (6,)
    assert (kl >= 0).all()
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_mean.double(), mean, rtol=0, atol=1e-6)


def test_gaussian_latent_sample_false_is_deterministic_and_sampling_is_not():
    torch.manual_seed(0)
    vae = _vae(latent_mode="gaussian")
    batch = _batch()
    a, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask, sample=False)
    b, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask, sample=False)
    assert torch.equal(a, b)
    s1, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask)
    s2, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask)
    assert not torch.equal(s1, s2)
    assert not torch.equal(s1, a)


def test_gaussian_loss_adds_the_weighted_kl():
    torch.manual_seed(0)
    vae = _vae(latent_mode="gaussian", kl_weight=0.5)
    batch = _batch()
    torch.manual_seed(1)
    loss, metrics = vae(batch)
    assert set(metrics) == {"nll", "kl"}
    torch.testing.assert_close(loss.detach(), metrics["nll"] + 0.5 * metrics["kl"])


def test_nb_loss_is_the_negative_log_likelihood_per_cell():
    from scipy.stats import nbinom

    torch.manual_seed(0)
    vae = _vae()
    batch = _batch()
    loss, metrics = vae(batch)
    z, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask)
    log_mu, log_theta = vae.distribution(z, batch.decode_gene_ids, batch.library_size)
    mu, theta = log_mu.exp().double().detach().numpy(), log_theta.exp().double().detach().numpy()
    expected = -nbinom.logpmf(batch.target.numpy(), theta, theta / (theta + mu)).sum(1).mean()
    assert set(metrics) == {"nll"}
    assert loss.item() == pytest.approx(expected, rel=1e-5)


CONFIGS = [
    dict(),
    dict(input_embedding="concat"),
    dict(latent_mode="gaussian"),
    dict(theta_mode="cell"),
    dict(likelihood="gaussian"),
    dict(share_gene_embedding=False),
    dict(n_layers=0),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_loss_is_finite_and_every_parameter_gets_a_gradient(kwargs):
    torch.manual_seed(0)
    vae = _vae(**kwargs)
    batch = _batch()
    loss, metrics = vae(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gene_theta_starts_at_one():
    head = _vae(theta_mode="gene").head
    assert head.log_theta.shape == (N_GENES,)
    assert torch.equal(head.log_theta, torch.zeros(N_GENES))


def test_cell_theta_starts_at_one():
    # NegativeBinomialHead zero-initialises to_log_theta so that theta = 1 at init, as in the gene
    # mode; SetVAE must not overwrite that with its generic Linear init.
    torch.manual_seed(0)
    head = _vae(theta_mode="cell").head
    assert not hasattr(head, "log_theta")
    hidden = torch.randn(2, 5, 16)
    _, log_theta = head.distribution(head.per_gene(hidden, torch.arange(5)), torch.full((2,), 100.0))
    assert torch.equal(head.to_log_theta.weight, torch.zeros_like(head.to_log_theta.weight))
    assert torch.equal(log_theta, torch.zeros(2, 5))


def test_shared_embedding_is_one_table():
    shared = _vae()
    assert shared.decoder_gene_embedding is shared.gene_embedding
    separate = _vae(share_gene_embedding=False)
    assert separate.decoder_gene_embedding is not separate.gene_embedding
    n_shared = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in separate.parameters()) == n_shared + N_GENES * 16
