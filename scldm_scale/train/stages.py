"""The two training stages as functions of a validated Config; each ends by writing a model artifact.

stage=vae: cells -> SetVAE, trained on the train split; the artifact `<ckpt_dir>/vae-model/` holds the
VAE, the gene vocabulary, the condition encoders, the library-size model and the run's provenance.
stage=ldm: the frozen VAE (read from the VAE artifact) encodes the train cells (posterior mean in the
Gaussian mode), latents are standardised per element, and a DiT prior is trained on them by flow
matching; its artifact `<ckpt_dir>/ldm-model/` embeds the VAE too, so `generate` needs nothing else.
Every training step folder keeps the artifact's other parts, so `scldm-scale export` can write it from
any step.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from scldm_scale import artifact
from scldm_scale.artifact import CheckpointError, LDMArtifact, Provenance, VAEArtifact
from scldm_scale.config import (
    Config,
    ConfigError,
    add_config_arguments,
    load_config,
    split_config_args,
    stage_optim,
    to_dict,
)
from scldm_scale.data.batch import CellBatch, TokenPolicy
from scldm_scale.data.dataset import ShuffledBatches
from scldm_scale.data.source import open_train_cells
from scldm_scale.host_memory import choose_policy
from scldm_scale.models.dit import DiT
from scldm_scale.models.library_size import LatentLibrarySize, LibrarySizeModel
from scldm_scale.models.prior import FlowMatchingPrior, LatentBatch
from scldm_scale.models.vae import SetVAE
from scldm_scale.outputs import add_overwrite, check_writable
from scldm_scale.train import distributed
from scldm_scale.train.checkpoint import RunCheckpoints
from scldm_scale.train.distributed import Dist
from scldm_scale.train.finetune import init_from
from scldm_scale.train.flops import TRAIN_FLOPS_FACTOR
from scldm_scale.train.tracking import start_tracker
from scldm_scale.train.trainer import Trainer
from scldm_scale.world import get_rank, resolve_device

log = logging.getLogger(__name__)
# train.init_gene_bias=data reads the counts of at most this many training cells.
GENE_BIAS_CELLS = 20_000


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _set_threads(cfg: Config) -> None:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    choose_policy(cfg.train.host_memory)  # how malloc treats freed blocks (host_memory.py)


@torch.no_grad()
def encode_latents(
    vae: SetVAE, batches: Iterator[CellBatch], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior-mean latents (N, M, L) of the cells of an ordered batch stream, in fp32 on the CPU, and the
    library sizes (N,) the VAE was given for them."""
    vae.eval()
    latents, library_sizes = [], []
    for batch in batches:
        library_sizes.append(batch.library_size.float())
        batch = batch.to(device)
        z, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask, sample=False)
        latents.append(z.float().cpu())
    return torch.cat(latents), torch.cat(library_sizes)


def _run_checkpoints(cfg: Config, stage: str, architecture: tuple[str, ...]) -> dict:
    """Training checkpoints under ckpt_dir/<stage>/, tagged with what a resume must match."""
    resolved = to_dict(cfg)
    # Kernel backends compute the same function, and decode_genes only picks the genes a step scores: a run
    # may resume with another one (e.g. finish a run trained on gene subsets with every gene).
    for key in ("attention_backend", "nb_loss_backend", "fold_pooling", "decode_genes"):
        resolved["model"].pop(key, None)
    meta = {"stage": stage, **{section: resolved[section] for section in architecture}}
    return {"checkpoints": RunCheckpoints(Path(cfg.train.ckpt_dir) / stage, cfg.train.keep_last), "run_meta": meta}


def model_path(cfg: Config, kind: str) -> Path:
    """Where a stage writes its model artifact."""
    return Path(cfg.train.ckpt_dir) / f"{kind}-model"


def _finish(cfg: Config, trainer: Trainer, skeleton: VAEArtifact | LDMArtifact, history: list[dict]) -> Path:
    """Consolidate the weights (a collective under FSDP / ZeRO-3) and write the artifact on rank 0."""
    model_state = trainer.strategy.full_state_dict()
    ema_state = trainer.strategy.full_ema_state_dict()
    path = model_path(cfg, skeleton.kind)
    if trainer.dist.is_main:
        config = to_dict(cfg)
        trained = skeleton.trained(
            model_state,
            ema_state,
            provenance=Provenance.of_run(config, trainer.step, trainer.dist.world_size),
            training={"config": config, "history": history},
        )
        trained.save(path)
        log.info("%s model written to %s", skeleton.kind.upper(), path)
    distributed.barrier()
    return path


def _build_device(cfg: Config):
    """Where the trained model is built: the meta device under train.init_on_meta (FSDP allocates shards)."""
    return torch.device("meta") if cfg.train.init_on_meta else contextlib.nullcontext()


def _vae_work(vae: SetVAE):
    """Tokens and training FLOPs of a VAE step on a batch (padded token count and decoded genes: what is
    computed)."""

    def work(batch: CellBatch) -> tuple[int, float]:
        n_cells, padded = batch.mask.shape
        per_cell = TRAIN_FLOPS_FACTOR * vae.forward_flops(padded, len(batch.decode_gene_ids), n_cells)
        return int(batch.mask.sum()), per_cell * n_cells

    return work


def _ldm_work(prior: FlowMatchingPrior, n_tokens: int):
    per_cell = TRAIN_FLOPS_FACTOR * prior.forward_flops()

    def work(batch: LatentBatch) -> tuple[int, float]:
        return batch.size * n_tokens, per_cell * batch.size

    return work


def _fit(trainer: Trainer, batches, tracker, on_step: Callable | None) -> list[dict]:
    trainer.maybe_resume(batches)
    try:
        return trainer.fit(batches, on_step)
    finally:
        if tracker is not None:
            tracker.finish()


def gene_bias_from_data(cfg: Config, n_genes: int) -> bool:
    """Whether a fresh VAE's per-gene logit offsets start from the data (train.init_gene_bias)."""
    setting = cfg.train.init_gene_bias
    if setting == "auto":
        decoded = cfg.model.decode_gene_count
        subsets = decoded is not None and decoded < n_genes
        setting = "data" if subsets and cfg.model.likelihood == "nb" and not cfg.train.init_on_meta else "zero"
    return setting == "data"


def gene_totals(batches: Iterator[CellBatch], n_genes: int, max_cells: int = GENE_BIAS_CELLS) -> torch.Tensor:
    """Each vocabulary gene's summed counts, (G,) float64, over the first max_cells cells of an ordered stream."""
    totals = torch.zeros(n_genes, dtype=torch.float64)
    n_cells = 0
    for batch in batches:
        totals.index_add_(0, batch.decode_gene_ids, batch.target.double().sum(0))
        n_cells += batch.target.shape[0]
        if n_cells >= max_cells:
            break
    return totals


def train_vae(cfg: Config, dist_info: Dist, on_step: Callable | None = None) -> Path:
    decode_genes = cfg.model.decode_gene_count
    cells = open_train_cells(cfg.data, cfg.train.batch_size, cfg.seed, decode_genes=decode_genes)
    n_genes = len(cells.gene_names)
    log.info("VAE: %d train cells x %d genes, conditions %s", cells.n_cells, n_genes, cfg.data.condition_keys)
    if decode_genes is not None and decode_genes < n_genes:
        log.info("VAE: each step decodes %d of the %d genes (model.decode_genes)", decode_genes, n_genes)
    with _build_device(cfg):
        vae = SetVAE(cfg.model, n_genes)
    if gene_bias_from_data(cfg, n_genes):  # before init_from: the genes it copies keep their trained offsets
        vae.head.init_gene_bias(gene_totals(cells.ordered(), n_genes))
        log.info("VAE: per-gene logit offsets start from the counts of the training cells (train.init_gene_bias)")
    if cfg.train.init_from:
        init_from(vae, cells.vocabulary, cfg.train.init_from)
    skeleton = VAEArtifact(
        config=cfg.model,
        genes=cells.vocabulary,
        encoders=cells.encoders,
        library_size=LibrarySizeModel.fit(cells.library_sizes, cells.labels),
        token_policy=TokenPolicy(cfg.data.gene_tokens, cfg.data.n_zero_tokens),
        weights={},
        allow_non_integer=cfg.data.allow_non_integer,
        training={"config": to_dict(cfg)},  # what `export` of a step folder records as the run's config
    )
    tracker = start_tracker(cfg, "vae", dist_info.is_main)
    trainer = Trainer(
        vae,
        stage_optim(cfg, "vae"),
        cfg.train,
        dist_info.device,
        desc="VAE",
        dist_info=dist_info,
        work=_vae_work(vae),
        tracker=tracker,
        export=artifact.to_parts(skeleton),
        **_run_checkpoints(cfg, "vae", ("model",)),
    )
    history = _fit(trainer, cells.batches, tracker, on_step)
    return _finish(cfg, trainer, skeleton, history)


def condition_balance_weights(condition_ids: dict[str, np.ndarray], power: float) -> np.ndarray | None:
    """Each cell's draw weight n^-power, n the cells sharing its combination of condition values; None (a plain
    shuffle) for power 0 or a single combination, where every cell would weigh the same."""
    if power == 0.0 or not condition_ids:
        return None
    ids = np.stack([np.asarray(v) for v in condition_ids.values()], axis=1)  # (N, K)
    _, combination, counts = np.unique(ids, axis=0, return_inverse=True, return_counts=True)
    if len(counts) == 1:
        return None
    weights = counts[combination.reshape(-1)].astype(np.float64) ** -power  # (N,)
    shares = np.bincount(combination.reshape(-1), weights=weights) / weights.sum()
    log.info(
        "LDM: condition-balanced draws (train.balance_conditions=%g): %d combinations, %.1f%%-%.1f%% of the draws "
        "each (%.1f%%-%.1f%% of the cells)",
        power, len(counts), 100 * shares.min(), 100 * shares.max(),
        100 * counts.min() / counts.sum(), 100 * counts.max() / counts.sum(),
    )  # fmt: skip
    return weights


def _fit_library_from_latent(standardised: torch.Tensor, library_sizes: torch.Tensor, seed: int) -> LatentLibrarySize:
    """The library size's fit on the standardised training latents; cells with no counts over the model's genes
    (possible with a var_filter) carry no depth to learn from and are left out, with a warning."""
    expressed = library_sizes > 0
    if not bool(expressed.all()):
        log.warning(
            "LDM: %d of %d training cells have no counts over the model's genes; the library-size fit leaves them out",
            int((~expressed).sum()), len(expressed),
        )  # fmt: skip
    return LatentLibrarySize.fit(standardised[expressed], library_sizes[expressed], seed=seed)


def train_ldm(cfg: Config, dist_info: Dist, on_step: Callable | None = None) -> Path:
    device = dist_info.device
    vae_model = artifact.load(cfg.train.vae_checkpoint, kind="vae")
    vae = vae_model.build_vae(device)
    encoders = vae_model.encoders
    if list(encoders) != list(cfg.data.condition_keys):
        raise CheckpointError(
            f"data.condition_keys={list(cfg.data.condition_keys)} but the VAE was trained with {list(encoders)}; "
            "the prior is conditioned on the VAE model's keys — use the same data.condition_keys"
        )
    cells = open_train_cells(cfg.data, cfg.train.batch_size, cfg.seed, vocabulary=vae_model.genes, encoders=encoders)
    # Every rank encodes the train cells (the latent table is small: N x M x L floats) in the same order.
    latents, library_sizes = encode_latents(vae, cells.ordered(), device)  # (N, M, L), (N,)
    latent_mean, latent_std = latents.mean(0), latents.std(0).clamp_min(1e-6)  # (M, L) each
    standardised = (latents - latent_mean) / latent_std
    library_from_latent = _fit_library_from_latent(standardised, library_sizes, cfg.seed)
    log.info(
        "LDM: library size from the latent: leave-one-out R^2 %.2f of log library size (residual sd %.3f, %d cells)",
        library_from_latent.loo_r2, library_from_latent.std, library_from_latent.n_cells,
    )  # fmt: skip
    conditions = {k: torch.from_numpy(v) for k, v in cells.condition_ids.items()}

    def latent_batch(rows: np.ndarray, _epoch: int) -> LatentBatch:
        return LatentBatch(standardised[rows], {k: v[rows] for k, v in conditions.items()})

    n_classes = {k: len(e.values) for k, e in encoders.items()}
    with _build_device(cfg):
        dit = DiT(cfg.prior, vae.cfg.n_latent_tokens, vae.cfg.latent_dim, n_classes)
        prior = FlowMatchingPrior(dit, cfg.prior.cond_drop_prob, cfg.prior.cond_dropout)
    n_params = sum(p.numel() for p in dit.parameters()) / 1e6
    log.info("LDM: DiT with %.2fM parameters on %d latents", n_params, len(latents))
    # Latents fit in memory (N x M x L floats), so the prior shuffles them in memory; ranks take slices.
    weights = condition_balance_weights(cells.condition_ids, cfg.train.balance_conditions)
    batches = ShuffledBatches(latent_batch, np.arange(len(latents)), cfg.train.batch_size, cfg.seed, weights=weights)
    skeleton = LDMArtifact(
        vae=vae_model,
        prior_config=cfg.prior,
        n_classes=n_classes,
        latent_mean=latent_mean,
        latent_std=latent_std,
        library_from_latent=library_from_latent,
        prior_weights={},
        prior_ema_weights={},
        training={"config": to_dict(cfg)},
    )
    tracker = start_tracker(cfg, "ldm", dist_info.is_main)
    trainer = Trainer(
        prior,
        stage_optim(cfg, "ldm"),
        cfg.train,
        device,
        use_ema=True,
        desc="LDM",
        dist_info=dist_info,
        work=_ldm_work(prior, vae.cfg.n_latent_tokens),
        tracker=tracker,
        export=artifact.to_parts(skeleton),
        **_run_checkpoints(cfg, "ldm", ("model", "prior")),
    )
    history = _fit(trainer, batches, tracker, on_step)
    return _finish(cfg, trainer, skeleton, history)


def run_training(cfg: Config, on_step: Callable | None = None) -> Path:
    """Train the config's stage with its strategy; the process group (if any) ends cleanly either way.

    on_step(step, record) runs after every optimizer step (Trainer.fit's callback; the profiler's steps).
    """
    seed_everything(cfg.seed)
    _set_threads(cfg)
    dist_info = distributed.setup(cfg.train, resolve_device(cfg.train.device))
    ok = False
    try:
        train = train_vae if cfg.stage == "vae" else train_ldm
        path = train(cfg, dist_info, on_step)
        ok = True
        return path
    finally:
        distributed.teardown(ok)


def preflight(cfg: Config, overwrite: bool) -> None:
    """Before any data is read: every location the run writes can be written, and a fresh start
    (train.resume=never) does not replace an earlier run of this stage in train.ckpt_dir (its checkpoints,
    its model, its metrics file) unless `overwrite`, which deletes that stage's checkpoints at once (rank 0);
    the earlier model is replaced only when the new one is written.

    The checkpoint folder is the one output a command reuses on purpose: train.resume=auto continues the
    run it holds (outputs.py)."""
    root = Path(cfg.train.ckpt_dir)
    check_writable(root, "the checkpoint folder", "train.ckpt_dir")
    if cfg.logging.wandb.mode != "disabled":
        check_writable(root / "wandb", "the W&B run folder", "train.ckpt_dir (or logging.wandb.mode=disabled)")
    metrics = Path(cfg.train.metrics_file) if cfg.train.metrics_file else None
    if metrics is not None:
        check_writable(metrics, "the metrics file", "train.metrics_file")
    if cfg.train.resume != "never":
        return
    if overwrite and get_rank() != 0:
        # Rank 0 alone looks for the earlier run and deletes it; reading the folder while it deletes it could
        # fail here. The other ranks wait for it when the process group is set up, before any step.
        return
    checkpoints = RunCheckpoints(root / cfg.stage).latest()
    earlier = [
        *([f"checkpoints of stage={cfg.stage} ({checkpoints})"] if checkpoints is not None else []),
        *([f"model {model_path(cfg, cfg.stage)}"] if model_path(cfg, cfg.stage).exists() else []),
        *([f"metrics {metrics}"] if metrics is not None and metrics.is_file() and metrics.stat().st_size else []),
    ]
    if earlier and not overwrite:
        raise ConfigError(
            f"train.ckpt_dir={root} holds an earlier run's {' and '.join(earlier)}; continue that run with "
            "train.resume=auto, start afresh in another train.ckpt_dir (and train.metrics_file), or pass "
            "--overwrite to replace them"
        )
    if checkpoints is not None and get_rank() == 0:
        shutil.rmtree(root / cfg.stage)  # a fresh run's step folders must not mix with the earlier run's
        log.warning("--overwrite: deleted the checkpoints of stage=%s under %s", cfg.stage, root)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale train CONFIG [CONFIG ...] [key=value ...] [--overwrite]`: the run is the config."""
    add_config_arguments(parser)
    add_overwrite(parser, "the checkpoints of an earlier run of the stage in train.ckpt_dir (train.resume=never)")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    cfg = load_config(*split_config_args(args.configs))
    preflight(cfg, args.overwrite)
    path = run_training(cfg)
    if get_rank() == 0:
        print(f"checkpoint: {path}")
