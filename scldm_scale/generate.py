"""Generate cells from an ldm checkpoint: DiT (EMA weights) -> latents -> VAE decoder -> NB counts.

The AnnData-facing side: conditions arrive as strings, are checked against the checkpoint's encoders
(an unknown value is an error listing the known ones), and the result carries integer counts in X,
the condition labels in .obs, gene names in .var and the generation settings in .uns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from scldm_scale.config import PriorConfig, section_from_dict
from scldm_scale.data.dataset import LabelEncoder
from scldm_scale.models.dit import DiT
from scldm_scale.models.library_size import LibrarySizeModel
from scldm_scale.models.sampling import integrate, make_guided_velocity_fn
from scldm_scale.models.vae import SetVAE
from scldm_scale.train.checkpoint import CheckpointError, load_checkpoint
from scldm_scale.train.stages import load_vae

DEFAULT_GUIDANCE = 1.0  # a requested condition with no --cfg weight is plain conditioning


@dataclass
class Generator:
    vae: SetVAE
    dit: DiT
    encoders: dict[str, LabelEncoder]
    library_size: LibrarySizeModel
    latent_mean: torch.Tensor  # (M, L)
    latent_std: torch.Tensor  # (M, L)
    gene_names: list[str]
    guidance_mode: str  # "compositional" or "joint"
    device: torch.device

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", use_ema: bool = True) -> Generator:
        ckpt = load_checkpoint(path, kind="ldm")
        device_ = torch.device(device)
        vae = load_vae(ckpt).to(device_)
        prior_cfg = section_from_dict(PriorConfig, ckpt["prior_config"], f"{path} prior config")
        dit = DiT(prior_cfg, vae.cfg.n_latent_tokens, vae.cfg.latent_dim, ckpt["n_classes"])
        try:
            dit.load_state_dict(ckpt["prior_ema_state"] if use_ema else ckpt["prior_state"])
        except RuntimeError as err:
            raise CheckpointError(f"{path}: prior weights do not match prior_config ({err})") from None
        mode = "joint" if prior_cfg.cond_dropout == "joint" else "compositional"
        return cls(
            vae=vae,
            dit=dit.to(device_).eval(),
            encoders={k: LabelEncoder.from_state(s) for k, s in ckpt["condition_encoders"].items()},
            library_size=LibrarySizeModel.from_state(ckpt["library_size"]),
            latent_mean=ckpt["latent_mean"].to(device_),
            latent_std=ckpt["latent_std"].to(device_),
            gene_names=list(ckpt["gene_names"]),
            guidance_mode=mode,
            device=device_,
        )

    def _check(self, labels: dict[str, np.ndarray], guidance: dict[str, float]) -> None:
        for key in list(labels) + list(guidance):
            if key not in self.encoders:
                raise ValueError(f"unknown condition key {key!r}; this model knows {', '.join(self.encoders)}")
        unguided = [k for k in guidance if k not in labels]
        if unguided:
            raise ValueError(f"--cfg given for {unguided} without a --condition value for it")

    @torch.no_grad()
    def sample(
        self,
        n_cells: int,
        labels: dict[str, np.ndarray],
        guidance: dict[str, float] | None = None,
        method: str = "heun",
        n_steps: int = 50,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        seed: int = 0,
        batch_size: int = 1024,
        progress: bool = True,
    ) -> np.ndarray:
        """Integer counts (N, G) for cells whose condition values are given per cell (key -> (N,) str).

        Cells with different values share one ODE solve (the condition ids are per cell); every key in
        `labels` is guided with its weight in `guidance` (default 1, plain conditioning); with no labels
        the cells come from the unconditional (all-NULL) prior and the global library-size fit.
        """
        labels = {k: np.asarray(v, dtype=object) for k, v in labels.items()}
        guidance = dict(guidance or {})
        self._check(labels, guidance)
        for key, values in labels.items():
            if len(values) != n_cells:
                raise ValueError(f"labels[{key!r}] has {len(values)} values for {n_cells} cells")
        ids = {k: torch.from_numpy(self.encoders[k].encode(v)).to(self.device) for k, v in labels.items()}
        weights = {k: guidance.get(k, DEFAULT_GUIDANCE) for k in labels}
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        library = np.empty(n_cells)
        combos = list(zip(*labels.values(), strict=True)) if labels else [()] * n_cells
        for combo in dict.fromkeys(combos):
            rows = np.array([c == combo for c in combos])
            library[rows] = self.library_size.sample(int(rows.sum()), dict(zip(labels, combo, strict=True)), rng)
        m, latent_dim = self.vae.latent_shape
        genes = torch.arange(len(self.gene_names), device=self.device)
        evals_per_batch = {"euler": n_steps, "heun": 2 * n_steps}.get(method)  # dopri5: adaptive, unknown
        n_batches = -(-n_cells // batch_size)
        total = evals_per_batch * n_batches if evals_per_batch else None
        bar = tqdm(total=total, desc="generate", unit="eval", disable=not progress, dynamic_ncols=True)
        out = []
        for start in range(0, n_cells, batch_size):
            stop = min(start + batch_size, n_cells)
            chunk_ids = {k: v[start:stop] for k, v in ids.items()}
            if self.guidance_mode == "joint":
                joint_weight = max(weights.values()) if weights else 0.0
                velocity = make_guided_velocity_fn(self.dit, chunk_ids, joint_weight, self.dit.null_ids, mode="joint")
            else:
                velocity = make_guided_velocity_fn(self.dit, chunk_ids, weights, self.dit.null_ids)
            noise = torch.randn(stop - start, m, latent_dim, device=self.device)
            x = integrate(_counted(velocity, bar), noise, method=method, n_steps=n_steps, atol=atol, rtol=rtol)
            z = x * self.latent_std + self.latent_mean  # (n, M, L)
            size = torch.from_numpy(library[start:stop]).float().to(self.device)
            out.append(self.vae.sample_counts(z, genes, size).cpu().numpy().astype(np.int64))
        bar.close()
        return np.concatenate(out) if out else np.zeros((0, len(self.gene_names)), dtype=np.int64)


def _counted(velocity, bar):
    """The velocity field, ticking the progress bar once per model evaluation."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bar.update(1)
        return velocity(x, t)

    return fn


def to_anndata(counts: np.ndarray, labels: dict[str, list[str]], gene_names: list[str], settings: dict) -> ad.AnnData:
    obs = pd.DataFrame({k: pd.Categorical(v) for k, v in labels.items()})
    obs.index = [f"gen-{i}" for i in range(counts.shape[0])]
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.int32)), obs=obs, var=pd.DataFrame(index=gene_names))
    adata.uns["generation"] = settings
    return adata


def generate(
    checkpoint: str,
    requests: list[tuple[dict[str, str], int]],
    guidance: dict[str, float] | None = None,
    method: str = "heun",
    n_steps: int = 50,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> ad.AnnData:
    """Cells for each (condition, n_cells) request, concatenated into one AnnData."""
    gen = Generator.from_checkpoint(checkpoint, device=device)
    keys = list(dict.fromkeys(k for condition, _ in requests for k in condition))
    for condition, _ in requests:
        if set(condition) != set(keys):
            raise ValueError(f"every request must set the same condition keys {keys}; got {list(condition)}")
    labels = {k: np.concatenate([np.full(n, c[k], dtype=object) for c, n in requests]) for k in keys}
    n_total = sum(n for _, n in requests)
    counts = gen.sample(n_total, labels, guidance, method=method, n_steps=n_steps, seed=seed, progress=progress)
    settings = {
        "checkpoint": str(checkpoint),
        "guidance": {k: float(v) for k, v in (guidance or {}).items()},
        "guidance_mode": gen.guidance_mode,
        "sampler": method,
        "n_steps": n_steps,
        "seed": seed,
        # JSON text: h5ad cannot store a list of dicts.
        "requests": json.dumps([{"condition": c, "n_cells": n} for c, n in requests]),
    }
    return to_anndata(counts, labels, gen.gene_names, settings)
