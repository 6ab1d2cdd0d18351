"""Gene-subset training (`model.decode_genes: N`): the draw of the decoded genes, the batch restricted to
them, the loss as the NB likelihood of the subset computed by hand, and both training sources."""

import signal

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats
import torch

from scldm_scale import artifact
from scldm_scale.config import ConfigError, DataConfig, load_config
from scldm_scale.data.batch import EXPRESSED_SHARE, LabelEncoder, collate, draw_decode_columns
from scldm_scale.data.soma import SomaBatches, SomaCells, SomaSpec
from scldm_scale.data.source import open_train_cells
from scldm_scale.models.vae import SetVAE
from scldm_scale.train.stages import run_training
from scldm_scale.train.trainer import TrainingInterrupted

# --- the draw -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_expressed", [0, 1, 7, 16])
def test_the_subset_keeps_every_expressed_gene_under_the_cap_and_has_n_genes(n_expressed):
    rng = np.random.default_rng(n_expressed)
    n_columns, n_decode = 101, 32  # cap: 16 expressed genes
    expressed = np.sort(rng.choice(n_columns, size=n_expressed, replace=False))
    columns = draw_decode_columns(expressed, n_columns, n_decode, np.random.default_rng(0))
    assert len(columns) == n_decode == len(np.unique(columns))
    assert np.all(np.diff(columns) > 0) and columns[0] >= 0 and columns[-1] < n_columns
    assert np.isin(expressed, columns).all()


def test_above_the_cap_half_the_subset_is_drawn_among_the_expressed_genes():
    n_columns, n_decode = 200, 40
    expressed = np.arange(0, 200, 2)  # 100 expressed genes, the cap is 20
    columns = draw_decode_columns(expressed, n_columns, n_decode, np.random.default_rng(3))
    assert len(columns) == n_decode
    assert np.isin(columns, expressed).sum() == int(EXPRESSED_SHARE * n_decode)
    # With too few unexpressed genes to fill the rest, the expressed genes fill it.
    expressed = np.arange(190)
    columns = draw_decode_columns(expressed, n_columns, n_decode, np.random.default_rng(3))
    assert len(columns) == n_decode and np.isin(np.arange(190, 200), columns).all()


def test_the_unexpressed_genes_are_drawn_uniformly():
    n_columns, n_decode = 30, 12
    expressed = np.array([0, 1, 2, 3])
    hits = np.zeros(n_columns)
    for seed in range(3000):
        hits[draw_decode_columns(expressed, n_columns, n_decode, np.random.default_rng(seed))] += 1
    assert (hits[:4] == 3000).all()
    # Each of the 26 unexpressed genes is drawn with probability 8/26: a chi-square test of uniformity.
    assert scipy.stats.chisquare(hits[4:]).pvalue > 1e-3
    np.testing.assert_allclose(hits[4:].mean(), 3000 * 8 / 26)


def test_n_at_least_the_gene_count_decodes_every_gene():
    np.testing.assert_array_equal(draw_decode_columns(np.array([2]), 9, 9, np.random.default_rng(0)), np.arange(9))
    np.testing.assert_array_equal(draw_decode_columns(np.array([2]), 9, 50, np.random.default_rng(0)), np.arange(9))


def test_decode_genes_is_validated():
    assert load_config(None, []).model.decode_gene_count is None
    assert load_config(None, ["model.decode_genes=512"]).model.decode_gene_count == 512
    for bad in ("0", "-4", "many", "2.5"):
        with pytest.raises(ConfigError, match="model.decode_genes must be 'all' or a positive number"):
            load_config(None, [f"model.decode_genes={bad}"])


# --- the batch ------------------------------------------------------------------------------------------


def _counts(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(2.0, size=(6, 40)).astype(np.float32) * (rng.random((6, 40)) < 0.2)
    dense[:, 0] = 1.0  # no empty cell
    return sp.csr_matrix(dense)


def test_collate_restricts_the_target_and_library_size_and_keeps_the_tokens():
    counts = _counts()
    vocabulary_positions = np.arange(100, 140)  # column j is vocabulary gene 100 + j
    columns = np.array([0, 3, 4, 11, 25, 39])
    full = collate(counts, {}, decode_gene_ids=vocabulary_positions)
    subset = collate(counts, {}, decode_gene_ids=vocabulary_positions, decode_columns=columns)
    dense = counts.toarray()
    np.testing.assert_array_equal(subset.target.numpy(), dense[:, columns])
    np.testing.assert_array_equal(subset.decode_gene_ids.numpy(), vocabulary_positions[columns])
    np.testing.assert_allclose(subset.library_size.numpy(), dense[:, columns].sum(axis=1))
    for name in ("gene_ids", "counts", "mask"):  # the encoder still sees every expressed gene
        torch.testing.assert_close(getattr(subset, name), getattr(full, name), rtol=0, atol=0)


def test_the_loss_is_the_nb_likelihood_of_the_subset_computed_by_hand():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.d_model=16", "model.n_heads=2", "model.n_cross_heads=2", "model.n_layers=1"])
    vae = SetVAE(cfg.model, 40)
    with torch.no_grad():  # a non-trivial head: per-gene offsets and dispersions
        vae.head.gene_bias.normal_()
        vae.head.log_theta.uniform_(-1.0, 2.0)
    counts = _counts(1)
    columns = draw_decode_columns(np.unique(counts.indices), 40, 12, np.random.default_rng(5))
    batch = collate(counts, {}, decode_columns=columns)
    loss, _ = vae(batch)

    # By hand: the full decode's logits on the subset, their softmax over the subset, the subset's library size.
    with torch.no_grad():
        z, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask)
        hidden = vae.decode(z, torch.arange(40))  # (B, 40, E): each gene's vector depends only on its query
        logits = (vae.head.to_logit(hidden).squeeze(-1) + vae.head.gene_bias).double().numpy()[:, columns]  # (B, N)
        theta = vae.head.log_theta.double().exp().numpy()[columns]  # (N,)
    x = counts.toarray()[:, columns].astype(np.float64)
    proportions = np.exp(logits - logits.max(1, keepdims=True))
    proportions /= proportions.sum(1, keepdims=True)
    mu = x.sum(1, keepdims=True) * proportions
    log_nb = scipy.stats.nbinom.logpmf(x, theta, theta / (theta + mu))  # NB(mu, theta) as scipy's (n, p)
    np.testing.assert_allclose(loss.item(), -log_nb.sum(1).mean(), rtol=1e-5)  # the head computes in fp32


# --- the sources ----------------------------------------------------------------------------------------


def _h5ad_cfg(path) -> DataConfig:
    return DataConfig(source="h5ad", path=str(path), condition_keys=["cell_type"])


def test_h5ad_stream_draws_per_batch_and_epoch_reproducibly_and_orders_all_genes(synthetic_h5ad):
    full = open_train_cells(_h5ad_cfg(synthetic_h5ad), batch_size=100, seed=0)
    subset = open_train_cells(_h5ad_cfg(synthetic_h5ad), batch_size=100, seed=0, decode_genes=20)
    again = open_train_cells(_h5ad_cfg(synthetic_h5ad), batch_size=100, seed=0, decode_genes=20)
    drawn = []
    for _ in range(3):  # fewer train cells than a batch: every step is the same cells, one epoch each
        a, b, c = next(full.batches), next(subset.batches), next(again.batches)
        columns = b.decode_gene_ids.numpy()
        assert len(columns) == 20
        torch.testing.assert_close(b.target, a.target[:, columns], rtol=0, atol=0)
        torch.testing.assert_close(b.library_size, a.target[:, columns].sum(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(b.gene_ids, a.gene_ids, rtol=0, atol=0)
        torch.testing.assert_close(c.decode_gene_ids, b.decode_gene_ids, rtol=0, atol=0)
        drawn.append(columns.tolist())
    assert drawn[0] != drawn[1] != drawn[2]  # the epoch keys the draw
    ordered = next(subset.ordered())  # encoding latents decodes every gene
    assert ordered.decode_gene_ids.tolist() == list(range(50))


def test_h5ad_stream_with_n_at_least_the_gene_count_equals_all(synthetic_h5ad):
    full = open_train_cells(_h5ad_cfg(synthetic_h5ad), batch_size=16, seed=3)
    whole = open_train_cells(_h5ad_cfg(synthetic_h5ad), batch_size=16, seed=3, decode_genes=50)
    for _ in range(3):
        a, b = next(full.batches), next(whole.batches)
        for name in ("gene_ids", "counts", "mask", "target", "decode_gene_ids", "library_size"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0, msg=name)


def test_soma_stream_decodes_a_reproducible_subset_of_the_same_batches(soma_experiment):
    cells = SomaCells(SomaSpec(soma_experiment.uri, obs_filter="split == 'train'", condition_keys=["cell_type"]))
    encoders = {k: LabelEncoder.fit(k, v) for k, v in cells.labels.items()}
    plan = {"batch_size": 6, "chunk_size": 8, "buffer_chunks": 3}
    full = SomaBatches(cells, encoders, seed=0, **plan)
    subset = SomaBatches(cells, encoders, seed=0, decode_genes=16, **plan)
    again = SomaBatches(cells, encoders, seed=0, decode_genes=16, **plan)
    for _ in range(4):
        a, b, c = next(full), next(subset), next(again)
        columns = b.decode_gene_ids.numpy()  # vocabulary positions; here the experiment's columns
        assert len(columns) == 16
        # These batches express all but a few of the 41 genes: those few are all decoded, expressed genes fill the rest.
        unexpressed = np.flatnonzero(a.target.sum(0).numpy() == 0)
        assert len(unexpressed) < 8 and np.isin(unexpressed, columns).all()
        torch.testing.assert_close(b.target, a.target[:, columns], rtol=0, atol=0)
        torch.testing.assert_close(b.library_size, a.target[:, columns].sum(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(b.gene_ids, a.gene_ids, rtol=0, atol=0)
        torch.testing.assert_close(c.decode_gene_ids, b.decode_gene_ids, rtol=0, atol=0)
    block = cells.read(np.arange(6))
    assert subset.make_batch(block, np.arange(6)).decode_gene_ids.tolist() == list(range(41))  # ordered reads
    train = open_train_cells(DataConfig(uri=soma_experiment.uri, condition_keys=["cell_type"]), 6, 0, decode_genes=16)
    assert len(next(train.batches).decode_gene_ids) == 16
    assert len(next(train.ordered()).decode_gene_ids) == 41


# --- training -------------------------------------------------------------------------------------------


def test_training_on_subsets_resumes_bit_exactly_and_may_resume_on_every_gene(
    tiny_overrides, synthetic_h5ad, tmp_path, monkeypatch
):
    def train(ckpt_dir, *extra):
        args = [*tiny_overrides, "data.source=h5ad", f"data.path={synthetic_h5ad}", "data.condition_keys=[cell_type]"]
        args += ["model.decode_genes=16", "train.max_steps=6", "train.ckpt_every=3", f"train.ckpt_dir={ckpt_dir}"]
        path = run_training(load_config(None, [*args, *extra]))
        return {h["step"]: h["loss"] for h in artifact.load(path).training["history"]}

    reference = train(tmp_path / "ref")  # 96 train cells, batches of 32: steps 4-6 are the second epoch
    assert sorted(reference) == list(range(1, 7))
    forward, calls = SetVAE.forward, []

    def forward_with_sigterm(self, batch):
        assert len(batch.decode_gene_ids) == 16
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGTERM)  # the step finishes, is checkpointed, and the run stops
        return forward(self, batch)

    monkeypatch.setattr(SetVAE, "forward", forward_with_sigterm)
    with pytest.raises(TrainingInterrupted):
        train(tmp_path / "run")
    monkeypatch.undo()
    assert train(tmp_path / "run", "train.resume=auto") == reference
    # decode_genes is not part of what a resume must match: a run may finish on every gene.
    longer = train(tmp_path / "run", "train.resume=auto", "model.decode_genes=all", "train.max_steps=7")
    assert max(longer) == 7
