"""Generated cells against real ones, metric by metric, overall and per condition, beside baselines.

Preprocessing (fixed, as in the literature; `PREPROCESSING` holds the numbers):
1. Genes are aligned to the real cells' as `data.vocab` matches them (by id, else by name). A gene on one
   side only is an error unless `intersect_genes`.
2. Each cell is normalised to 1e4 total counts and log1p-transformed.
3. PCA (30 components) is fitted on the reference cells (the real training cells when given, else the
   real cells) and applied to every set. The 2,000 highly variable genes (scanpy, flavor "seurat") are
   chosen on the same reference cells.

Metrics, each computed for every (method, condition) pair:
- in PC space: `mmd` (multi-bandwidth RBF, see metrics.mmd_rbf), `wasserstein2` (exact OT on
  subsamples), `frechet` (Gaussian fits), `c2st_accuracy` (a classifier telling real from generated;
  0.5 is perfect) and the k-NN `precision`, `recall`, `density`, `coverage`;
- on the log-normalised genes: `mean_r2`, `var_r2`, `mean_pearson`, `var_pearson` (per-gene means and
  variances); on the highly variable genes: `one_nn_accuracy` (leave-one-out 1-NN; 0.5 is perfect);
- on the counts: `dropout_mae` (per-gene fraction of zeros).

Conditions: "all"; "key=value" for each value of each condition key; "k1=v1, k2=v2" for each
combination when there are several keys; with held-out combinations also "seen" and "unseen" (the
real cells of the combinations used in training vs of those held out). A method is compared only with
the real cells of the conditions it generated, so "all" means all of those.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from scldm_scale.data.counts import DataError
from scldm_scale.data.vocab import GeneVocabulary, align_var
from scldm_scale.evaluate import metrics as m
from scldm_scale.evaluate.conditions import combination_labels, groups, unmatched

log = logging.getLogger(__name__)

# The PCA's components and highly variable genes are options (config.EvalConfig: n_pcs, n_hvg).
PREPROCESSING = {"target_sum": 1e4, "hvg_flavor": "seurat"}
# Fewer cells than this on either side and the nearest-neighbour and classifier metrics are skipped:
# a 5-fold classifier and k = 5 neighbourhoods need that many points to mean anything.
MIN_CELLS_NEIGHBOURS = 10
GENERATED = "generated"
# The real cells encoded, decoded and sampled through the VAE's head (evaluate/reconstruction.py).
CEILING = "reconstruction_ceiling"
# The noise floor's training cells, encoded, decoded and sampled the same way: what a prior that reproduced its
# training latents exactly would generate (evaluate/run.py).
TRAIN_RECONSTRUCTION = "train_reconstruction"


@dataclass
class CellSet:
    """Counts (cells × the aligned genes) with one label column per condition key, all strings."""

    counts: sp.csr_matrix
    labels: pd.DataFrame

    @classmethod
    def from_anndata(cls, adata: ad.AnnData, keys: Sequence[str], what: str) -> CellSet:
        return cls(sp.csr_matrix(adata.X, dtype=np.float64), cls.labels_of(adata, keys, what))

    @staticmethod
    def labels_of(adata: ad.AnnData, keys: Sequence[str], what: str) -> pd.DataFrame:
        """One string column per condition key, one row per cell."""
        missing = [k for k in keys if k not in adata.obs]
        if missing:
            raise DataError(f"{what}: condition keys {missing} are not obs columns; obs has {list(adata.obs)}")
        # The explicit index keeps one row per cell when there are no condition keys.
        return pd.DataFrame({k: adata.obs[k].astype(str).to_numpy() for k in keys}, index=pd.RangeIndex(adata.n_obs))

    def subset(self, rows: np.ndarray) -> CellSet:
        return CellSet(self.counts[rows], self.labels.iloc[rows].reset_index(drop=True))

    def __len__(self) -> int:
        return self.counts.shape[0]


def align_genes(sets: dict[str, ad.AnnData], intersect: bool) -> dict[str, ad.AnnData]:
    """The same genes in the same order on every side: the first set's genes and order, the others matched
    to them as `data.vocab` matches (by id, else by name) and named like them; restricted if asked."""
    names = list(sets)
    for name, a in sets.items():
        g = pd.Index(a.var_names)
        if not g.is_unique:
            raise DataError(f"{name}: duplicate gene ids in var_names, e.g. {g[g.duplicated()][:5].tolist()}")
    first = names[0]
    reference = GeneVocabulary.from_var(sets[first].var)
    alignments = {
        name: align_var(sets[name].var, reference, name, against=f"the {first} cells' genes") for name in names[1:]
    }
    shared = np.ones(len(reference), dtype=bool)
    for alignment in alignments.values():
        shared &= np.isin(np.arange(len(reference)), alignment.positions)
    kept = {name: np.isin(a.positions, np.flatnonzero(shared)) for name, a in alignments.items()}
    if not intersect:
        only = {first: np.asarray(reference.ids)[~shared].tolist()}
        for name, alignment in alignments.items():
            unshared = np.setdiff1d(np.arange(sets[name].n_vars), alignment.columns[kept[name]])
            only[name] = sets[name].var_names[unshared].tolist()
        problems = [f"{len(g)} genes only in {name} (e.g. {g[:5]})" for name, g in only.items() if g]
        if problems:
            raise DataError(
                "the gene sets differ: " + "; ".join(problems) + ". Evaluate on the shared genes with "
                "--intersect-genes, or align the files first"
            )
    if shared.sum() < 2:
        raise DataError(f"only {shared.sum()} genes are shared by {names}; check that var_names are gene ids")
    common = np.asarray(reference.ids)[shared].tolist()
    out = {first: sets[first][:, shared].copy()}
    for name, alignment in alignments.items():
        out[name] = sets[name][:, alignment.columns[kept[name]]].copy()
        out[name].var_names = common
    return out


@dataclass
class Features:
    """A cell set in the three spaces the metrics use."""

    counts: sp.csr_matrix
    lognorm: np.ndarray  # (cells, genes)
    pcs: np.ndarray  # (cells, n_pcs)
    hvg: np.ndarray  # (cells, n_hvg) log-normalised highly variable genes


class Preprocessor:
    """Normalisation, PCA and HVG choice fitted once on the reference cells, applied to every set."""

    def __init__(self, reference_counts: sp.csr_matrix, n_pcs: int, n_hvg: int):
        log.info(
            "preprocessing: PCA (%d components) and %d HVGs fitted on %d cells", n_pcs, n_hvg, reference_counts.shape[0]
        )
        reference = m.normalize_log1p(reference_counts, PREPROCESSING["target_sum"])
        self.pca = m.PCAProjector().fit(reference, n_components=n_pcs)
        self.hvg = m.highly_variable_genes(reference, n_top=n_hvg)

    def __call__(self, counts: sp.csr_matrix) -> Features:
        lognorm = m.normalize_log1p(counts, PREPROCESSING["target_sum"])
        return Features(counts, lognorm, self.pca.transform(lognorm), lognorm[:, self.hvg])


def group_metrics(real: Features, gen: Features, seed: int) -> dict[str, float]:
    """Every metric for one (method, condition) pair, with the cell counts compared.

    The Fréchet distance needs more cells than PCs on each side (else a covariance is singular and
    the value mostly measures the cell count); the neighbour and classifier metrics need
    MIN_CELLS_NEIGHBOURS. Smaller groups leave those metrics out.
    """
    n_real, n_gen = len(real.pcs), len(gen.pcs)
    out = {
        "n_real_cells": n_real,
        "n_cells": n_gen,
        "mmd": m.mmd_rbf(real.pcs, gen.pcs),
        "wasserstein2": m.wasserstein2(real.pcs, gen.pcs, seed=seed),
    }
    if min(n_real, n_gen) > real.pcs.shape[1]:
        out["frechet"] = m.frechet_distance(real.pcs, gen.pcs)
    out.update(m.moment_agreement(real.lognorm, gen.lognorm))
    out["dropout_mae"] = m.dropout_mae(real.counts, gen.counts)
    if min(n_real, n_gen) >= MIN_CELLS_NEIGHBOURS:
        out["one_nn_accuracy"] = m.one_nn_accuracy(real.hvg, gen.hvg, seed=seed)
        out["c2st_accuracy"] = m.classifier_two_sample_accuracy(real.pcs, gen.pcs, seed=seed)
        out.update(m.precision_recall_knn(real.pcs, gen.pcs, seed=seed))
    return out


def _rows(f: Features, mask: np.ndarray) -> Features:
    return Features(f.counts[mask], f.lognorm[mask], f.pcs[mask], f.hvg[mask])


def _note_unmatched(method: str, real: pd.DataFrame, gen: pd.DataFrame, notes: list[str]) -> None:
    """List in `notes` the combinations only one side has; none shared at all is an error."""
    only_real, only_method = unmatched(real, gen)
    if len(only_real) == len(set(combination_labels(real))):
        raise DataError(
            f"{method}: no condition combination is shared with the real cells (real: {only_real[:5]}, "
            f"{method}: {only_method[:5]}); check --condition-key and that both files label conditions alike"
        )
    if only_real:
        notes.append(f"{method}: no cells of {len(only_real)} real combination(s), e.g. {only_real[:3]}")
    if only_method:
        notes.append(f"{method}: {len(only_method)} combination(s) without real cells, e.g. {only_method[:3]}")


def compare(
    real: CellSet,
    methods: dict[str, CellSet],
    prep: Preprocessor,
    holdout: Sequence[Mapping[str, str]] = (),
    seed: int = 0,
    notes: list[str] | None = None,
) -> tuple[list[dict], dict[str, Features]]:
    """Records {metric, condition, method, value} of every method against the real cells, and the
    features of every set (key "real" and the method names), for the figures.

    Combinations that only one side has are left out of every group and listed in `notes`; a method
    that shares no combination with the real cells is an error. A progress bar counts the groups (on a
    terminal only; a log line per method otherwise).
    """
    notes = notes if notes is not None else []
    work = {method: list(groups(real.labels, cells.labels, holdout)) for method, cells in methods.items()}
    real_f = prep(real.counts)
    features = {"real": real_f}
    records = []
    with tqdm(
        total=sum(map(len, work.values())), desc="metrics", unit="group", disable=None, dynamic_ncols=True
    ) as bar:
        for method, cells in methods.items():
            bar.set_postfix_str(method)
            _note_unmatched(method, real.labels, cells.labels, notes)
            gen_f = features[method] = prep(cells.counts)
            for condition, real_rows, gen_rows in work[method]:
                bar.update()
                n_real, n_gen = int(real_rows.sum()), int(gen_rows.sum())
                if n_real < 2 or n_gen < 2:
                    if n_real and n_gen:  # an empty side is a combination already listed as unmatched
                        notes.append(f"{method}, {condition}: {n_real} real and {n_gen} cells, too few for a metric")
                    continue
                values = group_metrics(_rows(real_f, real_rows), _rows(gen_f, gen_rows), seed)
                records += [
                    {"metric": k, "condition": condition, "method": method, "value": float(v)}
                    for k, v in values.items()
                ]
            log.info("evaluated %s: %d cells, %d condition groups", method, len(cells), len(work[method]))
    return records, features
