"""Synthetic perturbation data with a known answer: cell lines x perturbations, negative binomial counts.

The generative model, per cell line l, perturbation p and gene g (all draws from one seeded generator):
- baseline log mean   b[l, g] = b0[g] + d[l, g],  b0 ~ N(0, gene_log_sd²) (log-normal gene means: a few
  genes dominate, many are rarely detected, as in real data), d ~ N(0, line_log_sd²) (each line its own
  profile);
- effect              e[l, p, g] = s[p, g] + u[l, p, g] on p's affected genes, 0 elsewhere and for `control`.
  The affected genes are a fraction `affected_fraction` of all genes (5%: sparse), drawn among the more
  expressed half, the same set in every line. The shared component s ~ N(0, shared_fraction · effect_sd²)
  and the line-specific u ~ N(0, (1 - shared_fraction) · effect_sd²) split the variance effect_sd², so
  one perturbation's log-fold changes in two lines correlate with coefficient `shared_fraction` on
  average (default 0.7: the effect partly transfers, so a model that composes line + perturbation has
  something to learn and something it cannot know);
- expression share    π[l, p, :] = softmax_g(b[l, :] + e[l, p, :]) (an effect changes the share of its
  genes; the others move only through the renormalisation);
- library size        L ~ LogNormal(log(median_library_size) + o[l], library_log_sd²) per cell, with a
  per-line depth offset o[l] ~ N(0, 0.2²);
- counts              x ~ Poisson(L · π · Gamma(θ_g, 1/θ_g)), i.e. NB with mean L · π and inverse
  dispersion θ_g ~ LogNormal(log THETA_MEDIAN, 0.5²) per gene.

The defaults, 3 lines x (control + 3 perturbations) x 100 cells = 1,200 cells over 400 genes with a
median library of 300, give about 17% non-zeros (about 67 expressed genes a cell, libraries of 130 to
570 for the middle 90% of cells) and train a VAE and a prior within minutes on two CPU cores.
The planted truth is in `.uns["synthetic_truth"]`: `log_fold_change` (lines, perturbations, genes) = e,
`shared_log_fold_change` (perturbations, genes) = s, `baseline_log_mean` (lines, genes) = b, `theta`
(genes,), the value orders `cell_lines` / `perturbations` of those axes, and `params`.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CONTROL = "control"
# Median NB inverse dispersion across genes: overdispersed, as UMI counts of variable genes are.
THETA_MEDIAN = 1.0


def synthetic_perturbation(
    n_cell_lines: int = 3,
    n_perturbations: int = 3,
    n_cells_per_group: int = 100,
    n_genes: int = 400,
    affected_fraction: float = 0.05,
    shared_fraction: float = 0.7,
    effect_sd: float = 1.5,
    gene_log_sd: float = 2.0,
    line_log_sd: float = 0.5,
    median_library_size: float = 300.0,
    library_log_sd: float = 0.35,
    seed: int = 0,
) -> ad.AnnData:
    """Counts of `n_cells_per_group` cells for every (cell line, perturbation or control) pair.

    obs: `cell_line` (line_A, line_B, ...) and `perturbation` (control, pert_1, pert_2, ...), categorical;
    var_names: GENE00001, ...; var `feature_name`: SYN1, ...; X: CSR int32 counts. Deterministic in `seed`.
    """
    if not 1 <= n_cell_lines <= 26:
        raise ValueError(f"n_cell_lines must be in 1..26 (lines are named line_A..line_Z), got {n_cell_lines}")
    if n_perturbations < 1 or n_cells_per_group < 1 or n_genes < 2:
        raise ValueError("n_perturbations and n_cells_per_group must be >= 1, n_genes >= 2")
    if not 0.0 < affected_fraction <= 1.0 or not 0.0 <= shared_fraction <= 1.0:
        raise ValueError("affected_fraction must be in (0, 1] and shared_fraction in [0, 1]")
    rng = np.random.default_rng(seed)
    lines = [f"line_{chr(ord('A') + i)}" for i in range(n_cell_lines)]
    perturbations = [CONTROL, *(f"pert_{i + 1}" for i in range(n_perturbations))]
    n_lines, n_conditions = len(lines), len(perturbations)

    gene_log_mean = rng.normal(0.0, gene_log_sd, n_genes)  # (G,)
    baseline = gene_log_mean + rng.normal(0.0, line_log_sd, (n_lines, n_genes))  # (C, G)
    theta = np.exp(rng.normal(np.log(THETA_MEDIAN), 0.5, n_genes))  # (G,)
    library_offset = rng.normal(0.0, 0.2, n_lines)  # (C,) lines differ in depth too

    # Effects fall on the more expressed half of the genes: one on a gene that is almost never detected
    # is invisible in any data, so evaluation could not tell whether a model learned it.
    candidates = np.flatnonzero(gene_log_mean >= np.median(gene_log_mean))
    n_affected = min(max(1, int(round(affected_fraction * n_genes))), len(candidates))
    shared = np.zeros((n_conditions, n_genes))  # (P, G), row 0 is the control: no effect
    effect = np.zeros((n_lines, n_conditions, n_genes))  # (C, P, G)
    for p in range(1, n_conditions):
        genes = np.sort(rng.choice(candidates, n_affected, replace=False))
        shared[p, genes] = rng.normal(0.0, effect_sd * np.sqrt(shared_fraction), n_affected)
        specific = rng.normal(0.0, effect_sd * np.sqrt(1.0 - shared_fraction), (n_lines, n_affected))  # (C, A)
        effect[:, p, genes] = shared[p, genes] + specific

    logits = baseline[:, None, :] + effect  # (C, P, G)
    share = np.exp(logits - logits.max(axis=-1, keepdims=True))
    share /= share.sum(axis=-1, keepdims=True)  # (C, P, G)

    line_of_cell = np.repeat(np.arange(n_lines), n_conditions * n_cells_per_group)  # (N,)
    condition_of_cell = np.tile(np.repeat(np.arange(n_conditions), n_cells_per_group), n_lines)  # (N,)
    n_cells = len(line_of_cell)
    library = np.exp(rng.normal(np.log(median_library_size) + library_offset[line_of_cell], library_log_sd))  # (N,)
    mean = library[:, None] * share[line_of_cell, condition_of_cell]  # (N, G)
    rate = mean * rng.gamma(theta, 1.0 / theta, (n_cells, n_genes))  # (N, G) gamma-Poisson = NB(mean, theta)
    counts = rng.poisson(rate)
    # A cell with no counts cannot be trained on; give the rare empty one a count in its most expressed gene.
    empty = np.flatnonzero(counts.sum(axis=1) == 0)
    counts[empty, np.argmax(mean[empty], axis=1)] = 1

    obs = pd.DataFrame(
        {
            "cell_line": pd.Categorical(np.array(lines)[line_of_cell], categories=lines),
            "perturbation": pd.Categorical(np.array(perturbations)[condition_of_cell], categories=perturbations),
        },
        index=[f"cell_{i:05d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"feature_name": [f"SYN{j + 1}" for j in range(n_genes)]},
        index=[f"GENE{j + 1:05d}" for j in range(n_genes)],
    )
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.int32)), obs=obs, var=var)
    adata.uns["synthetic_truth"] = {
        "cell_lines": np.array(lines),
        "perturbations": np.array(perturbations),
        "log_fold_change": effect,
        "shared_log_fold_change": shared,
        "baseline_log_mean": baseline,
        "theta": theta,
        "params": {
            "affected_fraction": affected_fraction,
            "shared_fraction": shared_fraction,
            "effect_sd": effect_sd,
            "gene_log_sd": gene_log_sd,
            "line_log_sd": line_log_sd,
            "median_library_size": median_library_size,
            "library_log_sd": library_log_sd,
            "seed": seed,
        },
    }
    return adata
