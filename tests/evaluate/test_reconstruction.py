"""VAE reconstruction metrics: streamed over batches of cells and chunks of genes, equal to the whole-matrix ones;
the reconstruction ceiling: drawn from the decoded distributions, scored by `evaluate` like every method."""

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from scldm_scale.artifact import VAEArtifact
from scldm_scale.config import EvalConfig, VAEConfig
from scldm_scale.data.batch import EXPRESSED_ONLY, LabelEncoder
from scldm_scale.data.dataset import CellDataset
from scldm_scale.data.vocab import GeneVocabulary
from scldm_scale.evaluate.embed import Embedder
from scldm_scale.evaluate.metrics import mmd_rbf, normalize_log1p, pearson
from scldm_scale.evaluate.reconstruction import StreamingPearson, reconstruction_metrics
from scldm_scale.evaluate.run import evaluate
from scldm_scale.evaluate.suite import CEILING, TRAIN_RECONSTRUCTION, Preprocessor
from scldm_scale.models.library_size import LibrarySizeModel
from scldm_scale.models.vae import SetVAE


def test_streaming_pearson_equals_the_whole_array():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 13))
    y = 0.5 * x + rng.normal(-1.0, 1.0, size=(50, 13))
    streamed = StreamingPearson()
    for rows in (slice(0, 1), slice(1, 20), slice(20, 50)):  # uneven blocks, one of a single row
        streamed.update(x[rows], y[rows])
    assert abs(streamed.value() - pearson(x.ravel(), y.ravel())) < 1e-12


def test_reconstruction_in_gene_chunks_and_cell_batches_matches_one_pass(monkeypatch):
    rng = np.random.default_rng(1)
    n_cells, n_genes = 11, 23
    counts = sp.csr_matrix(rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32) + np.eye(n_cells, n_genes))
    dataset = CellDataset(counts, [f"g{i}" for i in range(n_genes)], {}, {}, np.full(n_cells, "test"))
    tiny = dict(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8, mlp_ratio=2.0)
    torch.manual_seed(0)
    chunked = SetVAE(VAEConfig(**tiny, decode_chunk_genes=5), n_genes)
    monkeypatch.setattr("scldm_scale.evaluate.reconstruction.BATCH", 4)
    got, ceiling = reconstruction_metrics(chunked, dataset, np.arange(n_cells), torch.device("cpu"))
    assert ceiling is None  # drawn only when asked for
    # The same model decoding every gene of every cell at once, scored on whole matrices.
    batch = dataset.batch(np.arange(n_cells))
    with torch.no_grad():
        z, _ = chunked.encode(batch.gene_ids, batch.counts, batch.mask, sample=False)
        hidden = chunked.decode(z, batch.decode_gene_ids)
        distribution = chunked.head.distribution(
            chunked.head.per_gene(hidden, batch.decode_gene_ids), batch.library_size
        )
        nll = -chunked.head.log_prob(distribution, batch.library_size, batch.target).sum(-1).double().mean()
        mean = chunked.head.mean(distribution, batch.library_size).double().numpy()
    assert got["n_cells"] == n_cells
    assert abs(got["nll_per_cell"] - nll.item()) < 1e-4 * abs(nll.item())
    want = pearson(normalize_log1p(counts).ravel(), normalize_log1p(mean).ravel())
    assert abs(got["pearson_lognorm"] - want) < 1e-6


TINY = dict(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8, mlp_ratio=2.0)


class OracleVAE(SetVAE):
    """A VAE whose decoder returns each cell's true NB mean and dispersion: its encoder numbers the cells in the
    order it sees them (latent entry [0, 0]) and its decoder looks the numbers up."""

    def __init__(self, mu: np.ndarray, theta: float):
        super().__init__(VAEConfig(**TINY, decode_chunk_genes=7), mu.shape[1])
        self.true_log_mu = torch.as_tensor(np.log(mu), dtype=torch.float32)  # (N, G)
        self.true_log_theta = float(np.log(theta))
        self.seen = 0

    def encode(self, gene_ids, counts, mask, sample=True):
        z = torch.zeros(gene_ids.shape[0], *self.latent_shape)  # (B, M, L)
        z[:, 0, 0] = torch.arange(self.seen, self.seen + len(z))
        self.seen += len(z)
        return z, None

    def decode_per_gene(self, z, decode_gene_ids):
        logits = self.true_log_mu[z[:, 0, 0].long()][:, decode_gene_ids]  # (B, G)
        return logits, torch.full_like(logits, self.true_log_theta)


def _nb_cells(n_cells: int, profiles: np.ndarray, theta: float, rng) -> tuple[np.ndarray, sp.csr_matrix]:
    """(mu, counts) of n_cells cells, cell i of type i % n_types, with log-normal size factors."""
    mu = profiles[np.arange(n_cells) % len(profiles)] * rng.lognormal(0.0, 0.3, size=(n_cells, 1))  # (N, G)
    counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)
    counts[counts.sum(axis=1) == 0, 0] = 1
    return mu, sp.csr_matrix(counts)


def test_the_ceiling_of_a_vae_that_decodes_the_true_means_scores_like_the_noise_floor():
    """The ceiling draws from each cell's decoded distribution with its own library size: with the true means it
    is as close to the real cells as other real cells are; an untrained VAE's ceiling is far from them."""
    rng = np.random.default_rng(0)
    n_genes, theta = 60, 3.0
    profiles = rng.gamma(shape=0.5, scale=8.0, size=(3, n_genes))  # (T, G) mean counts per cell type
    mu, real = _nb_cells(90, profiles, theta, rng)
    _, floor = _nb_cells(90, profiles, theta, rng)
    _, train = _nb_cells(300, profiles, theta, rng)
    dataset = CellDataset(real, [f"g{i}" for i in range(n_genes)], {}, {}, np.full(90, "test"))
    idx = np.arange(90)

    def ceiling_of(vae: SetVAE, seed: int = 0) -> sp.csr_matrix:
        return reconstruction_metrics(vae, dataset, idx, torch.device("cpu"), ceiling_seed=seed)[1]

    oracle = ceiling_of(OracleVAE(mu, theta))
    torch.manual_seed(0)
    untrained = ceiling_of(SetVAE(VAEConfig(**TINY, decode_chunk_genes=7), n_genes))
    assert oracle.shape == real.shape and oracle.dtype.kind == "i"
    assert (ceiling_of(OracleVAE(mu, theta)) != oracle).nnz == 0  # the seed fixes the draw
    assert (ceiling_of(OracleVAE(mu, theta), seed=1) != oracle).nnz > 0
    # Each cell keeps its library size in expectation (the NB mean is library size x the decoded proportions).
    totals = np.asarray(oracle.sum(axis=1)).ravel() / np.asarray(real.sum(axis=1)).ravel()
    assert abs(np.median(totals) - 1.0) < 0.1

    prep = Preprocessor(train, n_pcs=10, n_hvg=40)
    real_pcs = prep(real).pcs
    mmd = {name: mmd_rbf(real_pcs, prep(cells).pcs) for name, cells in
           {"floor": floor, "oracle": oracle, "untrained": untrained}.items()}  # fmt: skip
    assert mmd["oracle"] < 1.5 * mmd["floor"], mmd
    assert mmd["untrained"] > 5 * mmd["floor"], mmd


def _untrained_vae_artifact(adata: ad.AnnData, folder) -> str:
    """A tiny untrained vae-model on adata's genes, decoding in chunks of 16 genes (the ceiling needs no training)."""
    torch.manual_seed(0)
    genes, labels = adata.var_names.tolist(), adata.obs["cell_type"].to_numpy()
    cfg = VAEConfig(**TINY, decode_chunk_genes=16)
    VAEArtifact(
        config=cfg,
        genes=GeneVocabulary(genes, genes),
        encoders={"cell_type": LabelEncoder.fit("cell_type", labels)},
        library_size=LibrarySizeModel.fit(np.asarray(adata.X.sum(axis=1)).ravel(), {"cell_type": labels}),
        token_policy=EXPRESSED_ONLY,
        weights=SetVAE(cfg, len(genes)).state_dict(),
    ).save(folder)
    return str(folder)


def test_evaluate_scores_the_ceiling_like_every_method_and_splits_the_gap(counts_adata, tmp_path):
    """With --vae-checkpoint the report gains the reconstruction_ceiling rows (all the real cells, every condition,
    the same metrics as the generated cells) and the VAE / prior decomposition; the VAE decodes in gene chunks."""
    cells = counts_adata()  # 120 cells, 50 genes, cell i of type i % 3
    # 8 real cells a type: the per-type groups skip the (slow) classifier and neighbour metrics
    train, real, generated = cells[:96].copy(), cells[96:].copy(), cells[:24].copy()
    vae = _untrained_vae_artifact(cells, tmp_path / "vae-model")
    opts = EvalConfig(["cell_type"], baselines=["real_train_cells"], n_hvg=40, plots=False, vae_checkpoint=vae)
    records = evaluate(real, generated, tmp_path / "eval", opts, train=train)
    ceiling = {(r["metric"], r["condition"]): r["value"] for r in records if r["method"] == CEILING}
    conditions = {f"cell_type={t}" for t in real.obs["cell_type"].unique()}
    assert {c for _, c in ceiling} == {"all"} | conditions
    assert ceiling[("n_cells", "all")] == ceiling[("n_real_cells", "all")] == real.n_obs
    for c in conditions:
        assert ceiling[("n_cells", c)] == (real.obs["cell_type"] == c.split("=")[1]).sum()
    for c in ("all", *conditions):
        generated_metrics = {r["metric"] for r in records if r["method"] == "generated" and r["condition"] == c}
        assert {m for m, c_ in ceiling if c_ == c} == generated_metrics
    # The floor's training cells through the VAE: the floor's conditions and cell counts, every metric.
    target = {(r["metric"], r["condition"]): r["value"] for r in records if r["method"] == TRAIN_RECONSTRUCTION}
    floor = {(r["metric"], r["condition"]): r["value"] for r in records if r["method"] == "real_train_cells"}
    assert set(target) == set(floor)
    assert all(target[("n_cells", c)] == floor[("n_cells", c)] for c in ("all", *conditions))
    assert target[("mmd", "all")] > 2 * floor[("mmd", "all")]  # an untrained VAE's cells are far from real ones
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| reconstruction_ceiling |" in report and "| train_reconstruction |" in report
    assert "## Where the gap to the noise floor comes from" in report
    row = next(line for line in report.splitlines() if line.startswith("| mmd |"))
    value = {(r["method"], r["metric"]): r["value"] for r in records if r["condition"] == "all"}
    vae_share = value[(TRAIN_RECONSTRUCTION, "mmd")] - value[("real_train_cells", "mmd")]
    prior_share = value[("generated", "mmd")] - value[(TRAIN_RECONSTRUCTION, "mmd")]
    assert f"| {vae_share:.4g} | {prior_share:.4g} |" in row


def test_train_reconstruction_reconstructs_exactly_the_noise_floor_cells(counts_adata, tmp_path, monkeypatch):
    """With a VAE that gives every cell back unchanged, the training cells through it are the noise floor's cells
    themselves: every record of train_reconstruction equals the floor's (same rows, same metric seeds)."""
    from scldm_scale.evaluate import reconstruction

    def identity(checkpoint, adata, device, ceiling_seed=None, what=None):
        return {"nll_per_cell": 0.0, "pearson_lognorm": 1.0, "n_genes_missing": 0}, adata.copy()

    monkeypatch.setattr(reconstruction, "reconstruction_of", identity)
    monkeypatch.setattr(Embedder, "from_artifact", lambda *args, **kwargs: "a VAE")  # nothing to read
    cells = counts_adata()
    train, real, generated = cells[:96].copy(), cells[96:].copy(), cells[:24].copy()
    opts = EvalConfig(["cell_type"], baselines=["real_train_cells"], n_hvg=40, plots=False, vae_checkpoint="unused")
    records = evaluate(real, generated, tmp_path / "eval", opts, train=train)
    by_method = {}
    for r in records:
        by_method.setdefault(r["method"], {})[(r["metric"], r["condition"])] = r["value"]
    assert by_method[TRAIN_RECONSTRUCTION] == by_method["real_train_cells"]
    assert by_method[TRAIN_RECONSTRUCTION] != by_method[CEILING]


def test_no_train_reconstruction_without_the_noise_floor(counts_adata, tmp_path):
    """train_reconstruction takes the noise floor's rows: without the real_train_cells baseline it is not drawn, so
    real cells of a combination the training cells lack (nothing to draw a floor from) still evaluate."""
    cells = counts_adata()  # cell i of type i % 3
    types = cells.obs["cell_type"].to_numpy()
    train = cells[types != types[2]].copy()
    real = cells[types == types[2]].copy()
    vae = _untrained_vae_artifact(cells, tmp_path / "vae-model")
    opts = EvalConfig(["cell_type"], baselines=[], n_hvg=40, plots=False, de=False, vae_checkpoint=vae)
    records = evaluate(real, real[:20].copy(), tmp_path / "eval", opts, train=train)
    methods = {r["method"] for r in records}
    assert CEILING in methods and TRAIN_RECONSTRUCTION not in methods
    assert "## Where the gap to the noise floor comes from" not in (tmp_path / "eval" / "report.md").read_text()
