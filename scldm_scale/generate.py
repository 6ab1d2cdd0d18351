"""Generate cells from an ldm model artifact: DiT (EMA weights) -> latents -> VAE decoder -> NB counts.

The AnnData-facing side: conditions arrive as strings, are checked against the model's encoders
(an unknown value is an error listing the known ones), and the result carries integer counts in X,
the condition labels in .obs, gene names in .var and the generation settings in .uns.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from scldm_scale import artifact
from scldm_scale.artifact import CheckpointError, LDMArtifact
from scldm_scale.config import (
    Config,
    ConfigError,
    SampleConfig,
    add_option,
    check_guidance_interval,
    check_sde_noise,
    from_flags,
    parse_floats,
    parse_pairs,
)
from scldm_scale.data.batch import LabelEncoder
from scldm_scale.data.vocab import GeneVocabulary
from scldm_scale.models.dit import DiT
from scldm_scale.models.library_size import LatentLibrarySize, LibrarySizeModel
from scldm_scale.models.sampling import integrate, make_guided_velocity_fn
from scldm_scale.models.vae import SetVAE
from scldm_scale.outputs import add_overwrite, claim_output, staged
from scldm_scale.world import resolve_device

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # imported in to_anndata: Generator.sample runs without anndata (bench gpu on a bare GPU machine)
    import anndata as ad


@dataclass
class Generator:
    """An ldm artifact's VAE and prior, built on a device and ready to sample."""

    vae: SetVAE
    dit: DiT
    encoders: dict[str, LabelEncoder]
    library_size: LibrarySizeModel
    latent_mean: torch.Tensor  # (M, L)
    latent_std: torch.Tensor  # (M, L)
    genes: GeneVocabulary
    guidance_mode: str  # the prior's own: "joint" if trained with prior.cond_dropout=joint, else "compositional"
    device: torch.device
    cond_dropout: str = "independent"  # prior.cond_dropout of its training: which guidance branches it learned
    library_from_latent: LatentLibrarySize | None = None  # the library size's fit on the latent (newer models)

    @classmethod
    def from_artifact(cls, model: LDMArtifact | str | Path, device: str = "cpu", use_ema: bool = True) -> Generator:
        """From an ldm artifact or its folder; the EMA weights of the prior unless use_ema=False."""
        model = artifact.load(model, kind="ldm") if isinstance(model, str | Path) else model
        if not isinstance(model, LDMArtifact):
            raise CheckpointError("generation needs an ldm model (`scldm-scale train ... stage=ldm`); got a VAE")
        device_ = resolve_device(device)
        return cls(
            vae=model.build_vae(device_),
            dit=model.build_prior(device_, use_ema=use_ema),
            encoders=model.vae.encoders,
            library_size=model.vae.library_size,
            latent_mean=model.latent_mean.to(device_),
            latent_std=model.latent_std.to(device_),
            genes=model.vae.genes,
            guidance_mode=model.guidance_mode,
            device=device_,
            cond_dropout=model.prior_config.cond_dropout,
            library_from_latent=model.library_from_latent,
        )

    def resolve_guidance_mode(self, requested: str) -> str:
        """The guidance mode a sampler's `guidance_mode` asks of this prior ("auto": the prior's own).

        Compositional guidance needs v_k, each key alone (learned under independent or one_at_a_time dropout);
        joint needs v_all, every key at once (learned under independent or joint dropout).
        """
        mode = self.guidance_mode if requested == "auto" else requested
        unlearned = {"compositional": "joint", "joint": "one_at_a_time"}.get(mode)
        if self.cond_dropout == unlearned:
            raise ConfigError(
                f"guidance mode {mode} (--guidance-mode, sample.guidance_mode): this prior was trained with "
                f"prior.cond_dropout={unlearned}, which never shows it the branches {mode} guidance evaluates; use "
                "--guidance-mode auto (or retrain the prior with prior.cond_dropout=independent, which learns both)"
            )
        return mode

    def resolve_library_size(self, requested: str) -> str:
        """Where a sampler's `library_size` takes the cells' library sizes from ("auto": latent when the model has
        the fit). "latent" from a model without the fit is refused."""
        if requested == "auto":
            return "latent" if self.library_from_latent is not None else "condition"
        if requested == "latent" and self.library_from_latent is None:
            raise ConfigError(
                "library size latent (--library-size, sample.library_size): this model has no library-size fit on "
                "the latent (its prior was trained before scldm-scale fitted one); use --library-size condition, or "
                "retrain the prior (stage=ldm) to get the fit"
            )
        return requested

    def velocity(
        self,
        ids: dict[str, torch.Tensor],
        weights: dict[str, float],
        mode: str,
        interval: tuple[float, float] = (0.0, 1.0),
    ):
        """The guided velocity field (x, t) -> v for cells of condition ids (key -> (n,)), `mode` resolved.
        joint takes one weight for all keys: the largest of `weights`. The weights apply at the times t in
        `interval` (checked by `check_guidance_interval`); at other times every weight is 1 (with one condition
        key the NULL branch then drops out: one model call)."""
        guided = _guided_velocity(self.dit, ids, weights, mode)
        lo, hi = interval
        if (lo, hi) == (0.0, 1.0) or all(w == 1.0 for w in weights.values()):
            return guided
        plain = _guided_velocity(self.dit, ids, dict.fromkeys(weights, 1.0), mode)

        def velocity_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inside = (t >= lo) & (t <= hi)  # (B,)
            if bool(inside.all()):
                return guided(x, t)
            if not bool(inside.any()):
                return plain(x, t)
            return torch.where(inside.reshape(-1, *[1] * (x.ndim - 1)), guided(x, t), plain(x, t))

        return velocity_fn

    def _check(self, labels: dict[str, np.ndarray], guidance: dict[str, float]) -> None:
        for key in list(labels) + list(guidance):
            if key not in self.encoders:
                raise ConfigError(f"unknown condition key {key!r}; this model knows {', '.join(self.encoders)}")
        unguided = [k for k in guidance if k not in labels]
        if unguided:
            raise ConfigError(f"--cfg given for {unguided} without a --condition value for it")

    @torch.no_grad()
    def sample(
        self,
        n_cells: int,
        labels: dict[str, np.ndarray],
        guidance: dict[str, float] | None = None,
        sampler: SampleConfig | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> sp.csr_matrix:
        """Integer counts (N, G), sparse, for cells whose condition values are given per cell (key -> (N,) str).

        Cells with different values share one ODE solve (the condition ids are per cell); every key in
        `labels` is guided with its weight in `guidance` (default `sampler.guidance`); with no labels the
        cells come from the unconditional (all-NULL) prior. Library sizes follow `sampler.library_size`: drawn
        given each cell's latent, or per condition value (the global fit with no labels). `sampler`
        (default: SampleConfig()) chooses the ODE solver and the cells per solve. The VAE decodes each solve's
        cells a chunk of genes at a time (model.decode_chunk_genes), and the counts are drawn and made sparse
        chunk by chunk: no dense cells x genes array is formed beyond one solve's per-gene parameters.
        """
        sampler = sampler or SampleConfig()
        labels = {k: np.asarray(v, dtype=object) for k, v in labels.items()}
        guidance = dict(guidance or {})
        self._check(labels, guidance)
        for key, values in labels.items():
            if len(values) != n_cells:
                raise ConfigError(f"labels[{key!r}] has {len(values)} values for {n_cells} cells")
        ids = {k: torch.from_numpy(self.encoders[k].encode(v)).to(self.device) for k, v in labels.items()}
        weights = {k: guidance.get(k, sampler.guidance) for k in labels}
        mode = self.resolve_guidance_mode(sampler.guidance_mode)
        interval = check_guidance_interval(sampler.guidance_interval, "sample.guidance_interval")
        library_mode = self.resolve_library_size(sampler.library_size)
        if library_mode != sampler.library_size:
            log.info("library sizes: %s (sample.library_size=auto)", library_mode)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        if library_mode == "latent":
            library_noise = rng.standard_normal(n_cells)  # the fit's residuals; the sizes follow each latent
        else:
            library = np.empty(n_cells)
            combos = list(zip(*labels.values(), strict=True)) if labels else [()] * n_cells
            for combo in dict.fromkeys(combos):
                rows = np.array([c == combo for c in combos])
                library[rows] = self.library_size.sample(int(rows.sum()), dict(zip(labels, combo, strict=True)), rng)
        m, latent_dim = self.vae.latent_shape
        genes = torch.arange(len(self.genes), device=self.device)
        # dopri5 is adaptive: its number of model evaluations is unknown in advance.
        steps = sampler.n_steps
        evals_per_batch = {"euler": steps, "sde": steps, "heun": 2 * steps}.get(sampler.method)
        n_batches = -(-n_cells // sampler.batch_size)
        total = evals_per_batch * n_batches if evals_per_batch else None
        bar = tqdm(total=total, desc="generate", unit="eval", disable=not progress, dynamic_ncols=True)
        blocks = []
        for start in range(0, n_cells, sampler.batch_size):
            stop = min(start + sampler.batch_size, n_cells)
            chunk_ids = {k: v[start:stop] for k, v in ids.items()}
            velocity = self.velocity(chunk_ids, weights, mode, interval)
            noise = torch.randn(stop - start, m, latent_dim, device=self.device)
            x = integrate(
                _counted(velocity, bar),
                noise,
                sampler.method,
                sampler.n_steps,
                sampler.atol,
                sampler.rtol,
                sde_noise=sampler.sde_noise,
            )
            z = x * self.latent_std + self.latent_mean  # (n, M, L)
            if library_mode == "latent":
                size = self.library_from_latent.sample(x, library_noise[start:stop])  # (n,)
            else:
                size = torch.from_numpy(library[start:stop]).float().to(self.device)  # (n,)
            blocks.append(self._sample_counts(z, genes, size))
        bar.close()
        return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(self.genes)), dtype=np.int32)

    def _sample_counts(self, z: torch.Tensor, genes: torch.Tensor, library_size: torch.Tensor) -> sp.csr_matrix:
        """NB (or Gaussian) counts of every gene for latents z (n, M, L), drawn a chunk of genes at a time."""
        distribution = self.vae.distribution(z, genes, library_size)  # (n, G) parameters, decoded in chunks
        return draw_counts(self.vae, distribution, library_size)


def _guided_velocity(dit: DiT, ids: dict[str, torch.Tensor], weights: dict[str, float], mode: str):
    if mode == "joint":
        joint_weight = max(weights.values()) if weights else 0.0
        return make_guided_velocity_fn(dit, ids, joint_weight, dit.null_ids, mode="joint")
    return make_guided_velocity_fn(dit, ids, weights, dit.null_ids)


def draw_counts(vae: SetVAE, distribution: tuple[torch.Tensor, ...], library_size: torch.Tensor) -> sp.csr_matrix:
    """Counts drawn from the VAE head's (n, G) parameters (SetVAE.distribution), a decoder chunk of genes at a
    time, into CSR: no dense (n, G) array of counts is formed. Uses the global torch RNG."""
    n_cells, n_genes = distribution[0].shape
    chunk = vae.decode_chunk(n_cells, n_genes)
    columns = []
    for start in range(0, n_genes, chunk):
        block = tuple(p[:, start : start + chunk] for p in distribution)  # (n, chunk) each
        counts = vae.head.sample(block, library_size)  # (n, chunk)
        columns.append(sp.csr_matrix(counts.cpu().numpy().astype(np.int32)))
    return sp.hstack(columns, format="csr")


def _counted(velocity, bar):
    """The velocity field, ticking the progress bar once per model evaluation."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bar.update(1)
        return velocity(x, t)

    return fn


def to_anndata(
    counts: sp.csr_matrix | np.ndarray, labels: dict[str, list[str]], genes: GeneVocabulary, settings: dict
) -> ad.AnnData:
    import anndata as ad

    obs = pd.DataFrame({k: pd.Categorical(v) for k, v in labels.items()})
    obs.index = [f"gen-{i}" for i in range(counts.shape[0])]
    var = pd.DataFrame(index=genes.ids)
    if genes.names is not None:
        var["feature_name"] = genes.names
    adata = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.int32), obs=obs, var=var)
    adata.uns["generation"] = settings
    return adata


def generate(
    model: LDMArtifact | str | Path,
    requests: list[tuple[dict[str, str], int]],
    guidance: dict[str, float] | None = None,
    sampler: SampleConfig | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> ad.AnnData:
    """Cells for each (condition, n_cells) request, concatenated into one AnnData (sampler: as `Generator.sample`)."""
    sampler = sampler or SampleConfig()
    gen = Generator.from_artifact(model, device=device)
    keys = list(dict.fromkeys(k for condition, _ in requests for k in condition))
    for condition, _ in requests:
        if set(condition) != set(keys):
            raise ConfigError(f"every request must set the same condition keys {keys}; got {list(condition)}")
    labels = {k: np.concatenate([np.full(n, c[k], dtype=object) for c, n in requests]) for k in keys}
    n_total = sum(n for _, n in requests)
    counts = gen.sample(n_total, labels, guidance, sampler, seed=seed, progress=progress)
    settings = {
        "checkpoint": str(model if not isinstance(model, LDMArtifact) else model.source or "in-memory model"),
        "guidance": {k: float(v) for k, v in (guidance or {}).items()},
        "guidance_mode": gen.resolve_guidance_mode(sampler.guidance_mode),
        "guidance_interval": [float(v) for v in sampler.guidance_interval],
        "sampler": sampler.method,
        "n_steps": sampler.n_steps,
        **({"sde_noise": float(sampler.sde_noise)} if sampler.method == "sde" else {}),
        "library_size": gen.resolve_library_size(sampler.library_size),
        "seed": seed,
        # JSON text: h5ad cannot store a list of dicts.
        "requests": json.dumps([{"condition": c, "n_cells": n} for c, n in requests]),
    }
    return to_anndata(counts, labels, gen.genes, settings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale generate`; the sampler's flags are views of `SampleConfig`."""
    parser.add_argument("checkpoint", metavar="MODEL", help="the ldm model artifact folder (<ckpt_dir>/ldm-model)")
    parser.add_argument("--n-cells", type=int, required=True, help="cells to generate")
    condition_help = "an obs value to generate, e.g. cell_type=B (repeatable, one per key; default: unconditional)"
    cfg_help = "guidance weight of a condition key, e.g. cell_type=2.0 (repeatable; default 1.0: plain conditioning)"
    parser.add_argument("--condition", action="append", default=[], metavar="KEY=VALUE", help=condition_help)
    parser.add_argument("--cfg", action="append", default=[], metavar="KEY=WEIGHT", help=cfg_help)
    add_option(parser, SampleConfig, "method", "--sampler")
    add_option(parser, SampleConfig, "n_steps", "--steps")
    add_option(parser, SampleConfig, "sde_noise")
    add_option(parser, SampleConfig, "guidance_mode")
    add_option(parser, SampleConfig, "library_size")
    # Parsed in `handle` (a ConfigError names the flag); the dest differs from the field so from_flags skips it.
    add_option(parser, SampleConfig, "guidance_interval", dest="guidance_interval_text", type=str, metavar="LO,HI")
    add_option(parser, Config, "seed")
    parser.add_argument("--device", default="cpu", help="torch device of the models")
    parser.add_argument("--out", required=True, help="output .h5ad")
    add_overwrite(parser, "the .h5ad at --out")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    condition = parse_pairs(args.condition, "--condition")
    guidance = parse_pairs(args.cfg, "--cfg", float)
    if args.n_cells <= 0:
        raise ConfigError(f"--n-cells must be positive, got {args.n_cells}")
    if args.n_steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.n_steps}")
    # Checked before sampling, so a bad --out fails now rather than after the whole run.
    claim_output(args.out, "the generated .h5ad", "--out", args.overwrite, folder=False)
    interval = parse_floats(args.guidance_interval_text, "--guidance-interval")
    check_guidance_interval(interval, "--guidance-interval")
    check_sde_noise(args.sde_noise, "--sde-noise")
    sampler = from_flags(SampleConfig, args, guidance_interval=interval)
    adata = generate(args.checkpoint, [(condition, args.n_cells)], guidance, sampler, args.seed, args.device)
    with staged(args.out) as target:
        adata.write_h5ad(target)
    print(f"wrote {adata.n_obs} cells x {adata.n_vars} genes to {args.out}")
