"""Which of a dataset's genes become a model's vocabulary: `all`, `hvg:N` or a file of genes.

- `all`: every gene (the default: foundation models are trained on the whole transcriptome).
- `hvg:N`: the N most variable genes by scanpy's `highly_variable_genes(flavor="seurat_v3")`, which ranks
  genes by the variance of their standardised raw counts against a loess fit of the mean-variance trend
  (hence raw counts, not log-normalised ones). It runs on at most `HVG_MAX_CELLS` cells drawn uniformly
  without replacement (seeded), which bounds its memory and time on data of millions of cells; the log says
  how many cells it used, and how many of them have no count over the chosen genes (such a cell gives the
  encoder no token: filter it out, or keep more genes).
- a file: one gene per line (blank lines and `#` comments ignored), matched to the data's genes as
  `data.vocab` matches them: by id, else by name. Listed genes the data lacks are logged, not an error.

The kept genes stay in the data's order. `prepare --genes` writes only them; `data.genes` selects them when
training a VAE (`soma_vocabulary` for a SOMA experiment or the Census).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from scldm_scale.data.counts import DataError
from scldm_scale.data.vocab import GeneVocabulary, align_genes

log = logging.getLogger(__name__)

HVG_MAX_CELLS = 20_000


@dataclass(frozen=True)
class GeneSelection:
    """A parsed `all` / `hvg:N` / file choice."""

    kind: str  # "all", "hvg" or "file"
    n_top: int = 0
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> GeneSelection:
        if text == "all":
            return cls("all")
        if text.startswith("hvg:"):
            n = text.removeprefix("hvg:")
            if not n.isdigit() or int(n) < 1:
                raise DataError(f"genes={text!r}: hvg:N needs a positive whole number of genes, e.g. hvg:2000")
            return cls("hvg", n_top=int(n))
        if not Path(text).is_file():
            raise DataError(f"genes={text!r} is neither all, hvg:N nor an existing file of gene ids (one per line)")
        return cls("file", path=text)


def read_gene_file(path: str | Path) -> list[str]:
    """The genes a file lists, one per line; blank lines and lines starting with # are skipped."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    genes = [line for line in lines if line and not line.startswith("#")]
    if not genes:
        raise DataError(f"{path}: lists no genes (one gene id or name per line)")
    return genes


def highly_variable(counts: sp.csr_matrix, n_top: int) -> np.ndarray:
    """Columns (ascending) of the n_top most variable genes of raw counts (cells x genes), Seurat v3."""
    import scanpy as sc

    try:
        table = sc.pp.highly_variable_genes(
            ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32)), flavor="seurat_v3", n_top_genes=n_top, inplace=False
        )
    except ValueError as err:  # scikit-misc's loess on too few genes or cells: "near singularities"
        raise DataError(
            f"hvg:{n_top}: seurat_v3 cannot fit its mean-variance trend on {counts.shape[0]} cells x "
            f"{counts.shape[1]} genes ({err}); keep all genes, or list the genes in a file"
        ) from None
    return np.flatnonzero(table["highly_variable"].to_numpy())


def hvg_rows(n_cells: int, seed: int) -> np.ndarray:
    """The cells (ascending rows) highly-variable genes are computed on: all, or HVG_MAX_CELLS drawn uniformly."""
    if n_cells <= HVG_MAX_CELLS:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(seed).choice(n_cells, size=HVG_MAX_CELLS, replace=False))


def select_genes(
    selection: GeneSelection | str,
    genes: GeneVocabulary,
    n_cells: int,
    read_rows: Callable[[np.ndarray], sp.csr_matrix],
    seed: int,
    where: str,
) -> np.ndarray:
    """Columns (ascending) of the data's genes that `selection` keeps.

    `genes` are the data's genes (ids and names, column order); `read_rows(rows)` returns the raw counts of
    the cells at ascending rows as CSR over every gene (read only for hvg:N).
    """
    selection = GeneSelection.parse(selection) if isinstance(selection, str) else selection
    if selection.kind == "all":
        return np.arange(len(genes))
    if selection.kind == "file":
        listed = read_gene_file(selection.path)
        # The file is the vocabulary the data is matched to: by id, else by name (a file of symbols).
        alignment = align_genes(genes.ids, GeneVocabulary(listed, listed), genes.names, where, selection.path)
        if alignment.missing:
            log.warning(
                "%s: %d of the %d genes listed in %s are not in the data, e.g. %s",
                where,
                len(alignment.missing),
                len(listed),
                selection.path,
                alignment.missing[:5],
            )
        columns = np.sort(alignment.columns)
        log.info(
            "%s: keeping the %d genes of %s (matched by %s)", where, len(columns), selection.path, alignment.matched_by
        )
        return columns
    if selection.n_top >= len(genes):
        log.warning("%s: hvg:%d asks for all %d genes or more; keeping all", where, selection.n_top, len(genes))
        return np.arange(len(genes))
    rows = hvg_rows(n_cells, seed)
    log.info(
        "%s: the %d most variable genes (seurat_v3 on raw counts) of %d genes, on %d of %d cells (seed %d)",
        where,
        selection.n_top,
        len(genes),
        len(rows),
        n_cells,
        seed,
    )
    counts = read_rows(rows)
    columns = highly_variable(counts, selection.n_top)
    n_empty = int((np.diff(counts[:, columns].tocsr().indptr) == 0).sum())
    if n_empty:
        log.warning(
            "%s: %d of the %d cells have no count over the %d genes kept", where, n_empty, len(rows), len(columns)
        )
    return columns


def soma_vocabulary(spec, selection: str, seed: int) -> GeneVocabulary | None:
    """The genes `selection` keeps of a SOMA experiment's (the cells of `spec`, a `data.soma.SomaSpec`), or
    None for all of them."""
    if selection == "all":
        return None
    from scldm_scale.data.soma import SomaCells

    cells = SomaCells(spec)
    genes = cells.vocabulary
    columns = select_genes(selection, genes, len(cells), cells.read, seed, spec.uri or "the Census")
    names = None if genes.names is None else [genes.names[c] for c in columns]
    return GeneVocabulary([genes.ids[c] for c in columns], names)
