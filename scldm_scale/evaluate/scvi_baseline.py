"""scVI beside scLDM: trained on the same training cells, scored like every method (optional extra `scvi`).

The model: scvi-tools' `SCVI` with a negative-binomial likelihood (scVI's default is zero-inflated; NB makes
its likelihood comparable with scLDM's), gene-wise dispersion, the observed library size, 10 latent
dimensions, and each condition key as a categorical covariate of the decoder (scVI's
`categorical_covariate_keys`). It trains on every training cell (no validation split) for
`EvalConfig.scvi_epochs` epochs.

It gives two methods and a reconstruction score:
- `scvi`: generated from its prior, z ~ N(0, I), decoded with the condition's covariates and a library
  size drawn from the training cells of that combination (all training cells where it has none), then
  sampled from the NB. This is the generator to compare with scLDM's generated cells. scVI's prior is not
  conditional: the condition reaches the cells only through the decoder.
- `scvi_posterior`: its posterior predictive of the real (test) cells, z ~ q(z | x) with the observed
  library size, then the NB; like scLDM's reconstruction ceiling it has seen the cells it is scored on.
- `scvi_reconstruction`: the NB negative log-likelihood of the real cells' counts per cell, summed over
  the genes, with z the posterior mean and the observed library size, and the Pearson r of the decoded
  means against the observed log-normalised counts: the same definitions as scLDM's VAE reconstruction
  (`evaluate/reconstruction.py`), so the two are in the same units.

Cells whose condition value the training cells never had cannot be encoded or decoded and are left out,
with a note.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scldm_scale.data.counts import DataError
from scldm_scale.evaluate.conditions import combination_labels
from scldm_scale.evaluate.metrics import normalize_log1p
from scldm_scale.evaluate.reconstruction import StreamingPearson
from scldm_scale.models.likelihoods import nb_log_prob

log = logging.getLogger(__name__)

SCVI_MISSING = (
    "the scvi baseline needs scvi-tools, which is not installed: pip install 'scldm-scale[scvi]', "
    "or leave scvi out of --baselines"
)
RECONSTRUCTION = "scvi_reconstruction"
N_LATENT = 10
BATCH = 256


def require_scvi():
    """The scvi module, or a DataError telling how to install it."""
    try:
        import scvi
    except ImportError:
        raise DataError(SCVI_MISSING) from None
    return scvi


@dataclass
class ScviBaseline:
    """What one trained scVI model gives: (counts, labels) of its two methods and its reconstruction scores."""

    prior: tuple[sp.csr_matrix, pd.DataFrame]
    posterior: tuple[sp.csr_matrix, pd.DataFrame]
    reconstruction: dict[str, float]
    model: object  # the trained scvi.model.SCVI

    def records(self) -> list[dict]:
        return [
            {"metric": k, "condition": "all", "method": RECONSTRUCTION, "value": float(v)}
            for k, v in self.reconstruction.items()
        ]


class _Scvi:
    """A trained SCVI model and the covariate codes of its condition values."""

    def __init__(self, counts: sp.csr_matrix, labels: pd.DataFrame, seed: int, max_epochs: int):
        scvi = require_scvi()
        self.keys = list(labels.columns)
        obs = labels.reset_index(drop=True).astype(str)
        obs.index = obs.index.astype(str)
        adata = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs)
        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(adata, categorical_covariate_keys=self.keys or None)
        self.model = scvi.model.SCVI(adata, n_latent=N_LATENT, gene_likelihood="nb")
        log.info("scvi baseline: %d epochs on %d training cells", max_epochs, counts.shape[0])
        self.model.train(
            max_epochs=max_epochs, accelerator="cpu", train_size=1.0, enable_progress_bar=False, early_stopping=False
        )
        self.module = self.model.module.cpu().eval()
        if self.keys:
            mappings = self.model.adata_manager.get_state_registry("extra_categorical_covs").mappings
            self.categories = {k: list(mappings[k]) for k in self.keys}
        else:
            self.categories = {}

    def known(self, labels: pd.DataFrame) -> np.ndarray:
        """Cells whose every condition value the model was trained with."""
        ok = np.ones(len(labels), dtype=bool)
        for key in self.keys:
            ok &= labels[key].astype(str).isin(self.categories[key]).to_numpy()
        return ok

    def _codes(self, labels: pd.DataFrame) -> torch.Tensor | None:
        if not self.keys:
            return None
        columns = [pd.Categorical(labels[k].astype(str), categories=self.categories[k]).codes for k in self.keys]
        return torch.as_tensor(np.stack(columns, axis=1), dtype=torch.long)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, library: np.ndarray, labels: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """(NB mean, NB inverse dispersion), each (cells, genes), of latents z with library sizes `library`."""
        log_library = torch.as_tensor(np.log(library), dtype=torch.float32).reshape(-1, 1)
        out = self.module.generative(
            z=z, library=log_library, batch_index=torch.zeros(len(z), 1, dtype=torch.long), cat_covs=self._codes(labels)
        )
        px = out["px"]
        return px.mu, px.theta.expand_as(px.mu)

    @torch.no_grad()
    def encode(self, counts: np.ndarray, labels: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """(posterior mean, posterior std) of z for raw counts."""
        x = torch.as_tensor(counts, dtype=torch.float32)
        out = self.module.inference(
            x=x, batch_index=torch.zeros(len(x), 1, dtype=torch.long), cat_covs=self._codes(labels)
        )
        return out["qz"].loc, out["qz"].scale


def _nb_sample(mu: torch.Tensor, theta: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    mu, theta = mu.double().numpy(), theta.double().numpy()
    return rng.poisson(rng.gamma(theta, mu / theta))  # Gamma(θ, μ/θ) then Poisson: NB(μ, θ)


def scvi_baseline(
    train_counts: sp.csr_matrix,
    train_labels: pd.DataFrame,
    real_counts: sp.csr_matrix,
    real_labels: pd.DataFrame,
    seed: int,
    max_epochs: int,
    notes: list[str] | None = None,
) -> ScviBaseline:
    """Train scVI on the training cells; its prior samples and posterior predictive for the real cells'
    conditions, and its reconstruction of the real cells (see the module's docstring)."""
    notes = notes if notes is not None else []
    model = _Scvi(train_counts, train_labels, seed, max_epochs)
    rng = np.random.default_rng(seed)
    known = model.known(real_labels)
    if not known.any():
        raise DataError(
            "the scvi baseline: no real cell has condition values the training cells have; check --condition-key"
        )
    if not known.all():
        unknown = sorted(set(combination_labels(real_labels[~known])))
        n = int((~known).sum())
        notes.append(f"scvi: {n} real cells of values unseen in training left out, e.g. {unknown[:3]}")
    labels = real_labels[known].reset_index(drop=True)
    counts = sp.csr_matrix(real_counts[np.flatnonzero(known)], dtype=np.float64)

    train_libraries = np.asarray(train_counts.sum(axis=1)).ravel()
    train_combo, combo = combination_labels(train_labels), combination_labels(labels)
    prior, posterior = [], []
    nll, correlation = [], StreamingPearson()
    for start in range(0, len(labels), BATCH):
        rows = np.arange(start, min(start + BATCH, len(labels)))
        batch_labels = labels.iloc[rows]
        x = counts[rows].toarray()
        # The prior: z ~ N(0, I), a library size of a training cell of the combination.
        pools = [np.flatnonzero(train_combo == c) for c in combo[rows]]
        library = np.array([train_libraries[rng.choice(p)] if len(p) else rng.choice(train_libraries) for p in pools])
        z = torch.as_tensor(rng.standard_normal((len(rows), N_LATENT)), dtype=torch.float32)
        prior.append(_nb_sample(*model.decode(z, library, batch_labels), rng))
        # The posterior: z ~ q(z | x) for the sample, its mean for the likelihood, the observed library size.
        mean, std = model.encode(x, batch_labels)
        observed = x.sum(axis=1)
        noise = torch.as_tensor(rng.standard_normal(tuple(mean.shape)), dtype=torch.float32)
        posterior.append(_nb_sample(*model.decode(mean + std * noise, observed, batch_labels), rng))
        mu, theta = model.decode(mean, observed, batch_labels)
        log_p = nb_log_prob(torch.as_tensor(x, dtype=torch.float64), mu.double().log(), theta.double().log())
        nll.append(-log_p.sum(-1))
        correlation.update(normalize_log1p(x), normalize_log1p(mu.double().numpy()))
    no_combo = sorted(set(combo) - set(train_combo))
    if no_combo:
        notes.append(f"scvi: library sizes of {no_combo[:3]} drawn from all training cells (none of their own)")
    reconstruction = {
        "nll_per_cell": float(torch.cat(nll).mean()),
        "pearson_lognorm": correlation.value(),
        "n_cells": float(len(labels)),
    }
    log.info("scvi reconstruction of %d real cells: NB NLL %.2f per cell", len(labels), reconstruction["nll_per_cell"])
    return ScviBaseline(
        prior=(sp.csr_matrix(np.concatenate(prior), dtype=np.float64), labels),
        posterior=(sp.csr_matrix(np.concatenate(posterior), dtype=np.float64), labels),
        reconstruction=reconstruction,
        model=model.model,
    )


def scvi_section(records: list[dict]) -> list[str]:
    """The report's lines on scVI's reconstruction, beside scLDM's VAE when it was scored too."""
    scvi = {r["metric"]: r["value"] for r in records if r["method"] == RECONSTRUCTION}
    if not scvi:
        return []
    vae = {r["metric"]: r["value"] for r in records if r["method"] == "reconstruction"}
    rows = [("scVI (NB, posterior mean)", scvi)] + ([("scLDM VAE", vae)] if "nll_per_cell" in vae else [])
    return [
        "",
        "## scVI beside scLDM: reconstruction of the real cells",
        "NB negative log-likelihood per cell, summed over the genes, with the observed library size and the "
        "posterior mean latent; Pearson r of the decoded means against the observed log-normalised counts. "
        "`scvi` rows above are sampled from scVI's prior (the condition enters through its decoder); "
        "`scvi_posterior` rows are its posterior predictive of the real cells, which it has seen.",
        "",
        "| model | NB NLL per cell | Pearson r |",
        "|---|---|---|",
        *[f"| {name} | {v['nll_per_cell']:.2f} | {v['pearson_lognorm']:.4f} |" for name, v in rows],
    ]
