"""The two training stages as functions of a validated Config.

stage=vae: cells -> SetVAE, trained on the train split; the checkpoint holds the VAE, the resolved
config, the gene vocabulary, the condition encoders and the library-size model.
stage=ldm: the frozen VAE encodes the train cells (posterior mean in the Gaussian mode), latents are
standardised per element, and a DiT prior is trained on them by flow matching; its checkpoint embeds
the VAE too, so `generate` needs nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from scldm_scale.config import Config, VAEConfig, section_from_dict, stage_optim, to_dict
from scldm_scale.data.dataset import CellBatch, LabelEncoder, ShuffledBatches
from scldm_scale.data.source import open_train_cells
from scldm_scale.models.dit import DiT
from scldm_scale.models.library_size import LibrarySizeModel
from scldm_scale.models.prior import FlowMatchingPrior, LatentBatch
from scldm_scale.models.vae import SetVAE
from scldm_scale.train import distributed
from scldm_scale.train.checkpoint import CheckpointError, RunCheckpoints, load_checkpoint, save_checkpoint
from scldm_scale.train.distributed import Dist
from scldm_scale.train.flops import TRAIN_FLOPS_FACTOR
from scldm_scale.train.tracking import start_tracker
from scldm_scale.train.trainer import Trainer, resolve_device

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _set_threads(cfg: Config) -> None:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)


def load_vae(ckpt: dict) -> SetVAE:
    vae_cfg = section_from_dict(VAEConfig, ckpt["vae_config"], "checkpoint VAE config")
    vae = SetVAE(vae_cfg, len(ckpt["gene_names"]))
    try:
        vae.load_state_dict(ckpt["vae_state"])
    except RuntimeError as err:
        raise CheckpointError(f"VAE weights do not match the stored VAE config: {err}") from None
    return vae.eval()


@torch.no_grad()
def encode_latents(vae: SetVAE, batches: Iterator[CellBatch], device: torch.device) -> torch.Tensor:
    """Posterior-mean latents (N, M, L) of the cells of an ordered batch stream, in fp32 on the CPU."""
    vae.eval()
    out = []
    for batch in batches:
        batch = batch.to(device)
        z, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask, sample=False)
        out.append(z.float().cpu())
    return torch.cat(out)


def _run_checkpoints(cfg: Config, stage: str, architecture: tuple[str, ...]) -> dict:
    """Training checkpoints under ckpt_dir/<stage>/, tagged with what a resume must match."""
    resolved = to_dict(cfg)
    # Kernel backends compute the same function: a run may resume with another one.
    for key in ("attention_backend", "nb_loss_backend", "fold_pooling"):
        resolved["model"].pop(key, None)
    meta = {"stage": stage, **{section: resolved[section] for section in architecture}}
    return {"checkpoints": RunCheckpoints(Path(cfg.train.ckpt_dir) / stage, cfg.train.keep_last), "run_meta": meta}


def exported_checkpoint(kind: str, payload: dict, model_state: dict, ema_state: dict | None) -> dict:
    """The single-file checkpoint `generate` reads: the stage's payload plus its weights.

    Used at the end of training and by `scldm-scale export` (from a step folder of any strategy).
    """
    if kind == "vae":
        return {**payload, "vae_state": model_state}
    strip = len("dit.")
    return {
        **payload,
        "prior_state": {k[strip:]: v for k, v in model_state.items() if k.startswith("dit.")},
        "prior_ema_state": {k[strip:]: v for k, v in (ema_state or {}).items() if k.startswith("dit.")},
    }


def _finish(cfg: Config, kind: str, trainer: Trainer, payload: dict, history: list[dict]) -> Path:
    """Consolidate the weights (a collective under FSDP / ZeRO-3) and write <ckpt_dir>/<kind>.pt on rank 0."""
    model_state = trainer.strategy.full_state_dict()
    ema_state = trainer.strategy.full_ema_state_dict()
    path = Path(cfg.train.ckpt_dir) / f"{kind}.pt"
    if trainer.dist.is_main:
        data = exported_checkpoint(kind, {**payload, "step": trainer.step, "history": history}, model_state, ema_state)
        save_checkpoint(path, kind, data)
        log.info("%s checkpoint written to %s", kind.upper(), path)
    distributed.barrier()
    return path


def _build_device(cfg: Config):
    """Where the trained model is built: the meta device under train.init_on_meta (FSDP allocates shards)."""
    return torch.device("meta") if cfg.train.init_on_meta else contextlib.nullcontext()


def _vae_work(vae: SetVAE, n_genes: int):
    """Tokens and training FLOPs of a VAE step on a batch (padded token count: what is computed)."""

    def work(batch: CellBatch) -> tuple[int, float]:
        n_cells, padded = batch.mask.shape
        per_cell = TRAIN_FLOPS_FACTOR * vae.forward_flops(padded, n_genes, n_cells)
        return int(batch.mask.sum()), per_cell * n_cells

    return work


def _ldm_work(prior: FlowMatchingPrior, n_tokens: int):
    per_cell = TRAIN_FLOPS_FACTOR * prior.forward_flops()

    def work(batch: LatentBatch) -> tuple[int, float]:
        return batch.size * n_tokens, per_cell * batch.size

    return work


def _fit(trainer: Trainer, batches, tracker) -> list[dict]:
    trainer.maybe_resume(batches)
    try:
        return trainer.fit(batches)
    finally:
        if tracker is not None:
            tracker.finish()


def train_vae(cfg: Config, dist_info: Dist) -> Path:
    cells = open_train_cells(cfg.data, cfg.train.batch_size, cfg.seed)
    n_genes = len(cells.gene_names)
    log.info("VAE: %d train cells x %d genes, conditions %s", cells.n_cells, n_genes, cfg.data.condition_keys)
    with _build_device(cfg):
        vae = SetVAE(cfg.model, n_genes)
    library = LibrarySizeModel.fit(cells.library_sizes, cells.labels)
    payload = {
        "config": to_dict(cfg),
        "vae_config": to_dict(cfg)["model"],
        "gene_names": cells.gene_names,
        "condition_encoders": {k: e.state_dict() for k, e in cells.encoders.items()},
        "library_size": library.state_dict(),
    }
    tracker = start_tracker(cfg, "vae", dist_info.is_main)
    trainer = Trainer(
        vae,
        stage_optim(cfg, "vae"),
        cfg.train,
        dist_info.device,
        desc="VAE",
        dist_info=dist_info,
        work=_vae_work(vae, n_genes),
        tracker=tracker,
        export=("vae", payload),
        **_run_checkpoints(cfg, "vae", ("model",)),
    )
    history = _fit(trainer, cells.batches, tracker)
    return _finish(cfg, "vae", trainer, payload, history)


def train_ldm(cfg: Config, dist_info: Dist) -> Path:
    device = dist_info.device
    vae_ckpt = load_checkpoint(cfg.train.vae_checkpoint, kind="vae")
    vae = load_vae(vae_ckpt).to(device)
    encoders = {k: LabelEncoder.from_state(s) for k, s in vae_ckpt["condition_encoders"].items()}
    if list(encoders) != list(cfg.data.condition_keys):
        raise CheckpointError(
            f"data.condition_keys={list(cfg.data.condition_keys)} but the VAE was trained with {list(encoders)}; "
            "the prior is conditioned on the VAE checkpoint's keys — use the same data.condition_keys"
        )
    cells = open_train_cells(
        cfg.data, cfg.train.batch_size, cfg.seed, vocabulary=vae_ckpt["gene_names"], encoders=encoders
    )
    # Every rank encodes the train cells (the latent table is small: N x M x L floats) in the same order.
    latents = encode_latents(vae, cells.ordered(), device)  # (N, M, L)
    latent_mean, latent_std = latents.mean(0), latents.std(0).clamp_min(1e-6)  # (M, L) each
    standardised = (latents - latent_mean) / latent_std
    conditions = {k: torch.from_numpy(v) for k, v in cells.condition_ids.items()}

    def latent_batch(rows: np.ndarray) -> LatentBatch:
        return LatentBatch(standardised[rows], {k: v[rows] for k, v in conditions.items()})

    n_classes = {k: len(e.values) for k, e in encoders.items()}
    with _build_device(cfg):
        dit = DiT(cfg.prior, vae.cfg.n_latent_tokens, vae.cfg.latent_dim, n_classes)
        prior = FlowMatchingPrior(dit, cfg.prior.cond_drop_prob, cfg.prior.cond_dropout)
    n_params = sum(p.numel() for p in dit.parameters()) / 1e6
    log.info("LDM: DiT with %.2fM parameters on %d latents", n_params, len(latents))
    # Latents fit in memory (N x M x L floats), so the prior shuffles them in memory; ranks take slices.
    batches = ShuffledBatches(latent_batch, np.arange(len(latents)), cfg.train.batch_size, cfg.seed)
    payload = {
        "config": to_dict(cfg),
        "vae_config": vae_ckpt["vae_config"],
        "vae_state": vae_ckpt["vae_state"],
        "prior_config": to_dict(cfg)["prior"],
        "n_classes": n_classes,
        "latent_mean": latent_mean,
        "latent_std": latent_std,
        "gene_names": vae_ckpt["gene_names"],
        "condition_encoders": vae_ckpt["condition_encoders"],
        "library_size": vae_ckpt["library_size"],
    }
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
        export=("ldm", payload),
        **_run_checkpoints(cfg, "ldm", ("model", "prior")),
    )
    history = _fit(trainer, batches, tracker)
    return _finish(cfg, "ldm", trainer, payload, history)


def run_training(cfg: Config) -> Path:
    """Train the config's stage with its strategy; the process group (if any) ends cleanly either way."""
    seed_everything(cfg.seed)
    _set_threads(cfg)
    dist_info = distributed.setup(cfg.train, resolve_device(cfg.train.device))
    ok = False
    try:
        path = train_vae(cfg, dist_info) if cfg.stage == "vae" else train_ldm(cfg, dist_info)
        ok = True
        return path
    finally:
        distributed.teardown(ok)
