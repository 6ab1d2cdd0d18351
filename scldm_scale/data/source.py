"""One entry point from a DataConfig to the training cells, whatever the source.

`open_train_cells` returns a `TrainCells`: a shuffled endless batch stream with a resumable state, the
gene vocabulary, the condition encoders, and per-cell labels / library sizes / condition ids of the
train split in a fixed order (for library-size fits and for encoding latents in order).
Sources: `soma` (a local SOMA experiment, the default), `census` (the CELLxGENE Census or a local
collection laid out like it), `h5ad` (in memory, for small data; also the built-in dataset).
The cells of `data.holdout_combinations` are not training cells, whatever the source: SOMA never reads
them (the obs value filter excludes them), the h5ad source drops their rows.
With `decode_genes` (the VAE's `model.decode_genes: N`), each batch of the shuffled stream decodes a subset
of N genes drawn from (seed, epoch, its cells); the ordered stream always decodes every gene.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scldm_scale.config import DataConfig
from scldm_scale.data.batch import CellBatch, LabelEncoder, TokenPolicy
from scldm_scale.data.counts import DataError
from scldm_scale.data.dataset import ShuffledBatches, build_dataset, load_anndata
from scldm_scale.data.genes import select_genes, soma_vocabulary
from scldm_scale.data.holdout import check_holdout, exclusion_filter, holdout_mask, match_filter
from scldm_scale.data.vocab import GeneAlignment, GeneVocabulary, MissingGenesError, align_var

log = logging.getLogger(__name__)

ORDERED_BATCH = 256


@dataclass
class TrainCells:
    batches: Any  # iterator of CellBatch with state_dict() / load_state_dict()
    vocabulary: GeneVocabulary
    encoders: dict[str, LabelEncoder]
    labels: dict[str, np.ndarray]  # key -> (N,) str, train cells in order
    condition_ids: dict[str, np.ndarray]  # key -> (N,) int64
    library_sizes: np.ndarray  # (N,)
    ordered: Any  # () -> Iterator[CellBatch] over the train cells in order

    @property
    def n_cells(self) -> int:
        return len(self.library_sizes)

    @property
    def gene_names(self) -> list[str]:
        """The vocabulary's gene ids, in model order."""
        return self.vocabulary.ids


def soma_spec(cfg: DataConfig, split: str | None, exclude_holdout: bool = False):
    """The cells of data.obs_filter in `split` (None: every split), without data.holdout_combinations'
    cells when `exclude_holdout` (training reads; evaluation wants the held-out cells)."""
    from scldm_scale.data.soma import SomaSpec

    census = cfg.source == "census"
    if cfg.source == "soma" and not cfg.uri:
        raise DataError(
            "data.source=soma needs data.uri=PATH of a SOMA experiment (make one with `scldm-scale prepare`)"
        )
    filters = [
        cfg.obs_filter,
        f"{cfg.split_key} == '{split}'" if split else None,
        exclusion_filter(cfg.holdout_combinations) if exclude_holdout else None,
    ]
    filters = [f for f in filters if f]
    return SomaSpec(
        uri=cfg.uri or "",
        layer=cfg.layer or ("raw" if census else "counts"),
        obs_filter=" and ".join(f"({f})" for f in filters) or None,
        var_filter=cfg.var_filter,
        census=census,
        census_version=cfg.census_version,
        organism=cfg.organism,
        condition_keys=list(cfg.condition_keys),
    )


def _has_split_column(cfg: DataConfig) -> bool:
    from scldm_scale.data.soma import obs_columns

    return cfg.split_key in obs_columns(soma_spec(cfg, None))


def open_train_cells(
    cfg: DataConfig,
    batch_size: int,
    seed: int,
    vocabulary: GeneVocabulary | list[str] | None = None,
    encoders: dict[str, LabelEncoder] | None = None,
    decode_genes: int | None = None,
) -> TrainCells:
    """The train split's cells of the configured source; with `vocabulary` (a trained model's genes) the
    data's genes are matched to it (`data.vocab`); with `decode_genes` the shuffled batches decode a drawn
    subset of that many genes (gene-subset training)."""
    if cfg.source == "h5ad":
        return _h5ad_train_cells(cfg, batch_size, seed, vocabulary, encoders, decode_genes)
    from scldm_scale.data.soma import SomaBatches, SomaCells

    split = "train" if _has_split_column(cfg) else None
    spec = soma_spec(cfg, split, exclude_holdout=True)
    selected = vocabulary is None and cfg.genes != "all"
    if selected:
        vocabulary = soma_vocabulary(spec, cfg.genes, seed)
    cells = SomaCells(spec, vocabulary=vocabulary)
    _check_missing(cells.alignment, spec.uri or "the Census", cfg.allow_missing_genes)
    if cfg.holdout_combinations:
        _check_soma_holdout(cfg, split, cells.labels)
    if encoders is None:
        encoders = {k: LabelEncoder.fit(k, v) for k, v in cells.labels.items()}
    if cells.n_counts is None:
        raise DataError(f"{cfg.uri}: obs has no n_counts (or raw_sum) column; ingest with `scldm-scale prepare`")
    batches = SomaBatches(
        cells,
        encoders,
        batch_size,
        seed,
        cfg.chunk_size,
        cfg.buffer_chunks,
        cfg.num_workers,
        policy=TokenPolicy(cfg.gene_tokens, cfg.n_zero_tokens),
        decode_genes=decode_genes,
        group_buffers=cfg.group_buffers,
    )

    def ordered() -> Iterator[CellBatch]:
        for start in range(0, len(cells), ORDERED_BATCH):
            positions = np.arange(start, min(start + ORDERED_BATCH, len(cells)))
            block = cells.read(positions)
            yield batches.make_batch(block, positions)

    # obs n_counts / raw_sum total all genes; the model sees only the genes read, so with a var_filter or a
    # gene selection the library-size fit must use the totals over those genes (one ordered pass).
    if cfg.var_filter or selected:
        library_sizes = np.concatenate([b.library_size.numpy() for b in ordered()]).astype(np.float64)
    else:
        library_sizes = cells.n_counts
    return TrainCells(
        batches=batches,
        vocabulary=cells.vocabulary,
        encoders=encoders,
        labels=cells.labels,
        condition_ids=batches.condition_ids,
        library_sizes=library_sizes,
        ordered=ordered,
    )


def _check_missing(alignment: GeneAlignment, where: str, allowed: bool) -> None:
    """The model's genes the data lacks: refused unless data.allow_missing_genes, then logged (absent tokens)."""
    missing = alignment.missing
    if missing and not allowed:
        raise MissingGenesError(
            f"{where}: {len(missing)} genes of the model's vocabulary are missing from the data, e.g. "
            f"{missing[:5]}; train on data with every gene of the model (absent ones as zero columns), or set "
            "data.allow_missing_genes=true to encode its cells without them (absent tokens)",
            missing,
        )
    if missing:
        log.warning(
            "%s: %d of the model's %d genes are missing from the data: absent tokens for the encoder (the model "
            "still decodes every gene)",
            where,
            len(missing),
            alignment.n_vocabulary,
        )


def _check_soma_holdout(cfg: DataConfig, split: str | None, train_labels: dict[str, np.ndarray]) -> None:
    """check_holdout on the obs of the held-out cells (any split), read with one filtered query."""
    from scldm_scale.data.soma import read_obs

    spec = soma_spec(cfg, None)
    combos = cfg.holdout_combinations
    spec.obs_filter = " and ".join(f"({f})" for f in (spec.obs_filter, match_filter(combos)) if f)
    keys = list(dict.fromkeys(k for c in combos for k in c))
    obs = read_obs(spec, keys + ([cfg.split_key] if split else []))
    in_train = obs[cfg.split_key].astype(str).to_numpy() == split if split else np.ones(len(obs), dtype=bool)
    where = cfg.uri or f"Census {cfg.census_version}"
    check_holdout(combos, obs, in_train, train_labels, where)


def _h5ad_train_cells(cfg, batch_size, seed, vocabulary, encoders, decode_genes) -> TrainCells:
    adata = load_anndata(cfg)
    where = cfg.path or f"built-in {cfg.builtin}"
    positions = None
    if vocabulary is not None:
        vocabulary = GeneVocabulary.of(vocabulary)
        alignment = align_var(adata.var, vocabulary, where)
        _check_missing(alignment, where, cfg.allow_missing_genes)
        adata = adata[:, alignment.columns].copy()
        adata.var_names = [vocabulary.ids[i] for i in alignment.positions]
        positions = alignment.positions if alignment.missing else None
    elif cfg.genes != "all":
        genes = GeneVocabulary.from_var(adata.var)
        columns = select_genes(cfg.genes, genes, adata.n_obs, lambda rows: sp.csr_matrix(adata.X[rows]), seed, where)
        expressed = np.asarray(adata.X[:, columns].sum(axis=1)).ravel() > 0
        if not expressed.all():
            log.warning("%s: dropping %d cells with no counts over the kept genes", where, int((~expressed).sum()))
        adata = adata[expressed][:, columns].copy()
    dataset = build_dataset(adata, cfg, encoders=encoders)
    dataset.gene_positions = positions  # columns -> the model's genes, when the data lacks some of them
    idx = dataset.indices("train")
    if cfg.holdout_combinations:
        obs = pd.DataFrame(dataset.obs)
        idx = idx[~holdout_mask(obs, cfg.holdout_combinations)[idx]]
        train_labels = {k: v[idx] for k, v in dataset.obs.items()}
        check_holdout(cfg.holdout_combinations, obs, dataset.split == "train", train_labels, where)

    def ordered() -> Iterator[CellBatch]:
        for start in range(0, len(idx), ORDERED_BATCH):
            rows = idx[start : start + ORDERED_BATCH]
            yield dataset.batch(rows)

    def shuffled(rows: np.ndarray, epoch: int) -> CellBatch:
        return dataset.batch(rows, decode_genes, draw_key=(seed, epoch))

    return TrainCells(
        batches=ShuffledBatches(shuffled, idx, batch_size, seed),
        vocabulary=vocabulary if vocabulary is not None else GeneVocabulary.from_var(adata.var),
        encoders=dataset.encoders,
        labels={k: v[idx] for k, v in dataset.obs.items()},
        condition_ids={k: v[idx] for k, v in dataset.condition_ids.items()},
        library_sizes=dataset.library_sizes(idx),
        ordered=ordered,
    )
