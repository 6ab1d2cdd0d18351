"""Synthetic negative binomial counts: perturbation data with a known answer (cell lines x perturbations, the
`synthetic_perturbation` built-in), and a whole-transcriptome sample (`synthetic_transcriptome`, 33,000 genes,
cell types and donors; `scldm-scale synthetic` writes it as an .h5ad).

The perturbation data's generative model, per cell line l, perturbation p and gene g (all draws from one
seeded generator):
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

import argparse

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scldm_scale.config import ConfigError
from scldm_scale.outputs import add_overwrite, claim_output, staged

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


def synthetic_transcriptome(
    n_cells: int = 500,
    n_genes: int = 33_000,
    n_cell_types: int = 6,
    n_donors: int = 3,
    n_programs: int = 4,
    gene_log_sd: float = 3.0,
    marker_fraction: float = 0.05,
    marker_sd: float = 1.5,
    program_fraction: float = 0.02,
    program_sd: float = 0.8,
    donor_sd: float = 0.2,
    median_library_size: float = 3000.0,
    library_log_sd: float = 0.5,
    seed: int = 0,
) -> ad.AnnData:
    """Raw counts shaped like a whole-transcriptome 10x sample: what `quickstart --data` is developed on.

    Per cell c of type t and donor d, gene g (draws from one seeded generator):
    - log expression share  b0[g] + marker[t, g] + donor[d, g] + Σ_k a[c, k] program[k, g], softmaxed over g:
      b0 ~ N(0, gene_log_sd²) (log-normal gene means: a few genes dominate, about half are never seen in a
      few hundred cells); each type shifts its own `marker_fraction` of the genes by N(0, marker_sd²);
      donors shift every gene a little (N(0, donor_sd²)); `n_programs` gene programs (each on
      `program_fraction` of the genes, loadings N(0, program_sd²)) vary continuously within a type with
      activities a ~ N(0, 1): the gene–gene correlation an independent per-gene NB cannot reproduce;
    - library size  L ~ LogNormal(log median_library_size, library_log_sd²) clipped to [1,200, 16,000]
      (the realised totals, NB noise on top, fall within about 1,000 to 20,000);
    - counts  x ~ NB(mean L · share, θ_g), θ_g ~ LogNormal(log THETA_MEDIAN, 0.5²) (gamma-Poisson).
    The defaults give 2–3% non-zeros (some 700 expressed genes a cell, 300 to 2,000); cells are drawn 256 at a time,
    so memory stays at a few (256, n_genes) arrays whatever n_cells.

    obs: `cell_type` (type_0, ...) and `donor` (donor_0, ...), categorical; var_names: Ensembl-like ids
    ENSG00000000001, ...; var `feature_name`: symbols SYN1, ...; X: CSR int32 counts; `.uns["synthetic_truth"]`
    holds the parameters. Deterministic in `seed`.
    """
    if n_cells < 1 or n_genes < 2 or n_cell_types < 1 or n_donors < 1 or n_programs < 0:
        raise ValueError("n_cells, n_cell_types and n_donors must be >= 1, n_genes >= 2, n_programs >= 0")
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, gene_log_sd, n_genes)  # (G,)
    theta = np.exp(rng.normal(np.log(THETA_MEDIAN), 0.5, n_genes))  # (G,)
    n_markers = max(1, round(marker_fraction * n_genes))
    marker = np.zeros((n_cell_types, n_genes))  # (T, G)
    for t in range(n_cell_types):
        marker[t, rng.choice(n_genes, n_markers, replace=False)] = rng.normal(0.0, marker_sd, n_markers)
    donor = rng.normal(0.0, donor_sd, (n_donors, n_genes))  # (D, G)
    n_loaded = max(1, round(program_fraction * n_genes))
    program = np.zeros((n_programs, n_genes))  # (K, G)
    for k in range(n_programs):
        program[k, rng.choice(n_genes, n_loaded, replace=False)] = rng.normal(0.0, program_sd, n_loaded)

    type_of_cell = rng.integers(0, n_cell_types, n_cells)  # (N,)
    donor_of_cell = rng.integers(0, n_donors, n_cells)  # (N,)
    activity = rng.normal(0.0, 1.0, (n_cells, n_programs))  # (N, K)
    library = np.clip(rng.lognormal(np.log(median_library_size), library_log_sd, n_cells), 1_200, 16_000)  # (N,)
    blocks = []
    for start in range(0, n_cells, 256):
        rows = slice(start, min(start + 256, n_cells))
        logits = base + marker[type_of_cell[rows]] + donor[donor_of_cell[rows]] + activity[rows] @ program  # (n, G)
        share = np.exp(logits - logits.max(axis=1, keepdims=True))
        share /= share.sum(axis=1, keepdims=True)  # (n, G)
        rate = library[rows, None] * share * rng.gamma(theta, 1.0 / theta, share.shape)  # (n, G) NB(L·share, θ)
        blocks.append(sp.csr_matrix(rng.poisson(rate).astype(np.int32)))
    types = [f"type_{t}" for t in range(n_cell_types)]
    donors = [f"donor_{d}" for d in range(n_donors)]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.array(types)[type_of_cell], categories=types),
            "donor": pd.Categorical(np.array(donors)[donor_of_cell], categories=donors),
        },
        index=[f"cell_{i:06d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"feature_name": [f"SYN{j + 1}" for j in range(n_genes)]},
        index=[f"ENSG{j + 1:011d}" for j in range(n_genes)],
    )
    adata = ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=obs, var=var)
    adata.uns["synthetic_truth"] = {
        "params": {
            "gene_log_sd": gene_log_sd,
            "marker_fraction": marker_fraction,
            "marker_sd": marker_sd,
            "program_fraction": program_fraction,
            "program_sd": program_sd,
            "donor_sd": donor_sd,
            "median_library_size": median_library_size,
            "library_log_sd": library_log_sd,
            "seed": seed,
        }
    }
    return adata


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale synthetic`: `synthetic_transcriptome` as an .h5ad, e.g. to try `quickstart --data` on."""
    parser.add_argument("--out", required=True, help="the .h5ad to write")
    parser.add_argument("--cells", type=int, default=500, help="cells")
    parser.add_argument("--genes", type=int, default=33_000, help="genes (Ensembl-like ids, symbols in feature_name)")
    parser.add_argument("--cell-types", type=int, default=6, help="cell types (obs cell_type)")
    parser.add_argument("--donors", type=int, default=3, help="donors (obs donor)")
    library_help = "median library size; realised totals clipped to [1,200, 16,000] before NB noise"
    parser.add_argument("--median-library", type=float, default=3000.0, help=library_help)
    marker_help = "sd of the log shift of each cell type's marker genes: smaller is harder to tell apart"
    parser.add_argument("--marker-sd", type=float, default=1.5, help=marker_help)
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    add_overwrite(parser, "the .h5ad at --out")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    if min(args.cells, args.cell_types, args.donors) < 1 or args.genes < 2:
        raise ConfigError(
            f"--cells, --cell-types and --donors must be >= 1 and --genes >= 2; got {args.cells}, {args.cell_types}, "
            f"{args.donors} and {args.genes}"
        )
    if args.median_library <= 0 or args.marker_sd < 0:
        raise ConfigError(
            f"--median-library must be positive and --marker-sd >= 0; got {args.median_library} and {args.marker_sd}"
        )
    claim_output(args.out, "the synthetic .h5ad", "--out", args.overwrite, folder=False)
    adata = synthetic_transcriptome(
        args.cells,
        args.genes,
        args.cell_types,
        args.donors,
        marker_sd=args.marker_sd,
        median_library_size=args.median_library,
        seed=args.seed,
    )
    with staged(args.out) as target:
        adata.write_h5ad(target)
    share = adata.X.nnz / (adata.n_obs * adata.n_vars)
    print(f"wrote {adata.n_obs} cells x {adata.n_vars} genes ({share:.1%} non-zero) to {args.out}")
