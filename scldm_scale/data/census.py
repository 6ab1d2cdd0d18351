"""`scldm-scale synthetic-census`: a synthetic experiment laid out like the CELLxGENE Census, for scale checks.

What is unusual here:
- The layout is the Census's, so the `census` data source (cellxgene_census.open_soma(uri=...)) and
  tiledbsoma-ml read it as they read the real one: a root Collection holding `census_info` (the `summary`
  and `datasets` DataFrames) and `census_data`, whose `homo_sapiens` Experiment has obs (dataset_id,
  assay, cell_type + ontology id, tissue, tissue_general, donor_id, is_primary_data, raw_sum, nnz, ...)
  and the `RNA` measurement: var (feature_id as Ensembl-like ids, feature_name, feature_length, nnz,
  n_measured_obs) and the float32 X layer `raw`.
- Cells come from several source datasets, one contiguous block of soma_joinids each (as the Census
  orders them), each with its own cell-type mixture, tissue and a per-gene scaling (a batch effect);
  within a dataset cells are sorted by cell type, as concatenated annotated h5ads are.
- Counts are drawn count by count: a cell's library size (lognormal) of draws from its (dataset, cell
  type) gene distribution, i.e. multinomial given the library size. That costs O(library size) per cell,
  not O(genes), so 36,000 genes cost no more than 2,000, and the heavy-tailed gene distribution gives
  ~1-2k expressed genes per cell at a median library size of 2,000.
- It is written in blocks of `ROWS_PER_WRITE` cells (one TileDB fragment per block and array), so the
  memory stays bounded whatever the number of cells (peak RSS 2.0 GB for 200,000 x 36,000, 1.8 GB for
  20,000 x 36,000); var (with the per-gene nnz) is written last.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from scldm_scale.data.counts import DataError
from scldm_scale.outputs import add_overwrite, claim_output, staged

log = logging.getLogger(__name__)

ORGANISM = "homo_sapiens"
MEASUREMENT = "RNA"
LAYER = "raw"
ROWS_PER_WRITE = 10_000  # cells per fragment: ~15M non-zeros at ~1.5k per cell
ROWS_PER_DRAW = 1_000  # cells whose counts are drawn at once: bounds the draw buffers (~library x 1,000)
CELL_TYPES = (
    ("T cell", "CL:0000084"),
    ("B cell", "CL:0000236"),
    ("natural killer cell", "CL:0000623"),
    ("classical monocyte", "CL:0000860"),
    ("dendritic cell", "CL:0000451"),
    ("endothelial cell", "CL:0000115"),
    ("fibroblast", "CL:0000057"),
    ("epithelial cell", "CL:0000066"),
    ("macrophage", "CL:0000235"),
    ("plasma cell", "CL:0000786"),
    ("mast cell", "CL:0000097"),
    ("neutrophil", "CL:0000775"),
)
TISSUES = (("blood", "blood"), ("lung", "lung"), ("lymph node", "lymph node"), ("colon", "large intestine"))
ASSAYS = ("10x 3' v3", "10x 3' v2", "10x 5' v1")


@dataclass
class CensusDesign:
    """Everything but the counts, drawn once from the seed: which cell comes from which dataset and type."""

    dataset_of_cell: np.ndarray  # (N,) int, contiguous blocks
    type_of_cell: np.ndarray  # (N,) int, sorted within each dataset
    library_sizes: np.ndarray  # (N,) int, counts drawn per cell
    type_profiles: np.ndarray  # (T, G) float, each type's gene proportions
    dataset_scales: np.ndarray  # (D, G) float, each dataset's per-gene factor
    dataset_tissue: np.ndarray  # (D,) int
    dataset_assay: np.ndarray  # (D,) int


def census_design(n_cells: int, n_genes: int, n_datasets: int, median_library: float, seed: int) -> CensusDesign:
    rng = np.random.default_rng([seed, 0])
    n_types = len(CELL_TYPES)
    # Dataset sizes vary tenfold; each has its own mixture of the types (some absent).
    sizes = rng.lognormal(0.0, 0.8, size=n_datasets)
    bounds = np.round(np.cumsum(sizes) / sizes.sum() * n_cells).astype(np.int64)
    counts = np.diff(np.concatenate([[0], bounds]))
    dataset_of_cell = np.repeat(np.arange(n_datasets), counts)
    type_of_cell = np.concatenate(
        [np.sort(rng.choice(n_types, size=c, p=rng.dirichlet(np.full(n_types, 0.7)))) for c in counts]
    )
    base = rng.lognormal(0.0, 1.8, size=n_genes)  # heavy tailed: a few genes take most counts
    log_fold = rng.normal(0.0, 0.5, size=(n_types, n_genes))  # (T, G)
    log_fold += (rng.random((n_types, n_genes)) < 0.02) * rng.normal(2.0, 0.5, size=(n_types, n_genes))  # markers
    profiles = base * np.exp(log_fold)  # (T, G)
    profiles /= profiles.sum(axis=1, keepdims=True)
    return CensusDesign(
        dataset_of_cell=dataset_of_cell,
        type_of_cell=type_of_cell,
        library_sizes=np.maximum(1, rng.lognormal(np.log(median_library), 0.6, size=n_cells)).astype(np.int64),
        type_profiles=profiles,
        dataset_scales=rng.lognormal(0.0, 0.3, size=(n_datasets, n_genes)),  # (D, G)
        dataset_tissue=rng.integers(len(TISSUES), size=n_datasets),
        dataset_assay=rng.integers(len(ASSAYS), size=n_datasets),
    )


def draw_counts(design: CensusDesign, start: int, stop: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO (row within the block, gene, count) of cells start..stop-1, rows ascending, genes ascending per row."""
    rng = np.random.default_rng([seed, 1, start])
    n_genes = design.type_profiles.shape[1]
    libraries = design.library_sizes[start:stop]
    groups = design.dataset_of_cell[start:stop] * len(CELL_TYPES) + design.type_of_cell[start:stop]
    keys = []
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        dataset, cell_type = divmod(int(group), len(CELL_TYPES))
        cdf = np.cumsum(design.type_profiles[cell_type] * design.dataset_scales[dataset])  # (G,)
        draws = rng.random(int(libraries[rows].sum())) * cdf[-1]
        genes = np.minimum(np.searchsorted(cdf, draws, side="right"), n_genes - 1)
        keys.append(np.repeat(rows, libraries[rows]) * n_genes + genes)
    cells_genes, counts = np.unique(np.concatenate(keys), return_counts=True)
    return cells_genes // n_genes, cells_genes % n_genes, counts


def _obs_block(design: CensusDesign, start: int, stop: int, raw_sum: np.ndarray, nnz: np.ndarray) -> pa.Table:
    datasets = design.dataset_of_cell[start:stop]
    types = design.type_of_cell[start:stop]
    tissues = design.dataset_tissue[datasets]
    donors = (np.arange(start, stop) * 7919) % 4  # four donors per dataset, interleaved
    return pa.table(
        {
            "soma_joinid": pa.array(np.arange(start, stop), pa.int64()),
            "dataset_id": [f"synthetic-dataset-{d:03d}" for d in datasets],
            "assay": [ASSAYS[a] for a in design.dataset_assay[datasets]],
            "cell_type": [CELL_TYPES[t][0] for t in types],
            "cell_type_ontology_term_id": [CELL_TYPES[t][1] for t in types],
            "tissue": [TISSUES[t][0] for t in tissues],
            "tissue_general": [TISSUES[t][1] for t in tissues],
            "donor_id": [f"donor-{d:03d}-{k}" for d, k in zip(datasets, donors, strict=True)],
            "disease": ["normal"] * (stop - start),
            "sex": ["unknown"] * (stop - start),
            "suspension_type": ["cell"] * (stop - start),
            "is_primary_data": pa.array(np.ones(stop - start, dtype=bool)),
            "raw_sum": pa.array(raw_sum, pa.float64()),
            "nnz": pa.array(nnz, pa.int64()),
        }
    )


def gene_ids(n_genes: int) -> list[str]:
    """Ensembl-like ids, ENSG + 11 digits."""
    return [f"ENSG{j + 1:011d}" for j in range(n_genes)]


def census_collection(
    root: str | Path, summary: dict[str, str] | None = None, datasets: pa.Table | None = None
) -> None:
    """Create the Census's root collection: census_info (with the summary and datasets DataFrames when
    given) and an empty census_data, where each organism's experiment goes (`experiment_path`, `link_experiment`)."""
    import tiledbsoma

    with tiledbsoma.Collection.create(str(root)) as census:
        with census.add_new_collection("census_info") as info:
            if summary is not None:
                schema = pa.schema(
                    [("soma_joinid", pa.int64()), ("label", pa.large_string()), ("value", pa.large_string())]
                )
                table = pa.table(
                    {"soma_joinid": range(len(summary)), "label": list(summary), "value": list(summary.values())},
                    schema=schema,
                )
                _add_dataframe(info, "summary", table)
            if datasets is not None:
                _add_dataframe(info, "datasets", datasets)
        census.add_new_collection("census_data")


def _add_dataframe(collection, key: str, table: pa.Table) -> None:
    with collection.add_new_dataframe(key, schema=table.schema, domain=[(0, len(table) - 1)]) as frame:
        frame.write(table)


def experiment_path(root: str | Path, organism: str = ORGANISM) -> Path:
    return Path(root) / "census_data" / organism


def link_experiment(root: str | Path, organism: str = ORGANISM) -> None:
    """Register the experiment written at experiment_path(root, organism) in census_data."""
    import tiledbsoma

    with tiledbsoma.Collection.open(str(Path(root) / "census_data"), "w") as data:
        with tiledbsoma.Experiment.open(str(experiment_path(root, organism))) as exp:
            data.set(organism, exp, use_relative_uri=True)


def write_synthetic_census(
    out: str | Path,
    n_cells: int,
    n_genes: int,
    n_datasets: int = 12,
    median_library: float = 2_000.0,
    seed: int = 0,
) -> dict:
    """Write the synthetic Census at `out` (which must not exist); returns a summary of what was written."""
    import tiledbsoma

    out = Path(out)
    if out.exists():
        raise DataError(f"{out} exists; pass a new --out folder")
    if n_datasets < 1 or n_cells < n_datasets or n_genes < 1 or not median_library > 0:
        raise DataError(
            f"need --datasets >= 1, at least one cell per dataset, one gene and a positive --median-library (got "
            f"{n_cells} cells, {n_genes} genes, {n_datasets} datasets, median library {median_library})"
        )
    started = time.perf_counter()
    design = census_design(n_cells, n_genes, n_datasets, median_library, seed)
    dataset_names = [f"synthetic-dataset-{d:03d}" for d in range(n_datasets)]
    datasets = pa.table(
        {
            "soma_joinid": pa.array(np.arange(n_datasets), pa.int64()),
            "collection_id": ["synthetic-collection"] * n_datasets,
            "dataset_id": dataset_names,
            "dataset_title": [f"synthetic dataset {d}" for d in range(n_datasets)],
            "dataset_total_cell_count": pa.array(np.bincount(design.dataset_of_cell, minlength=n_datasets), pa.int64()),
        }
    )
    summary = {
        "census_schema_version": "2.1.0",
        "census_build_date": "synthetic",
        "dataset_schema_version": "5.2.0",
        "total_cell_count": str(n_cells),
        "unique_cell_count": str(n_cells),
    }
    obs_schema = _obs_block(design, 0, 1, np.zeros(1), np.zeros(1, dtype=np.int64)).schema
    gene_nnz = np.zeros(n_genes, dtype=np.int64)
    nnz_total = 0
    census_collection(out, summary, datasets)
    exp_uri = str(experiment_path(out))
    with tiledbsoma.Experiment.create(exp_uri) as exp:
        obs = exp.add_new_dataframe("obs", schema=obs_schema, domain=[(0, n_cells - 1)])
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection(MEASUREMENT, tiledbsoma.Measurement)
        x = rna.add_new_collection("X").add_new_sparse_ndarray(LAYER, type=pa.float32(), shape=(n_cells, n_genes))
        for start in range(0, n_cells, ROWS_PER_WRITE):
            stop = min(start + ROWS_PER_WRITE, n_cells)
            rows, genes, counts = [], [], []
            for sub in range(start, stop, ROWS_PER_DRAW):
                r, g, c = draw_counts(design, sub, min(sub + ROWS_PER_DRAW, stop), seed)
                rows.append(r + sub)
                genes.append(g)
                counts.append(c)
            rows, genes, counts = np.concatenate(rows), np.concatenate(genes), np.concatenate(counts)
            x.write(
                pa.table(
                    {
                        "soma_dim_0": pa.array(rows, pa.int64()),
                        "soma_dim_1": pa.array(genes, pa.int64()),
                        "soma_data": pa.array(counts.astype(np.float32)),
                    }
                )
            )
            nnz = np.bincount(rows - start, minlength=stop - start)
            raw_sum = np.bincount(rows - start, weights=counts, minlength=stop - start)
            obs.write(_obs_block(design, start, stop, raw_sum, nnz))
            gene_nnz += np.bincount(genes, minlength=n_genes)
            nnz_total += len(counts)
            log.info("synthetic census: %d / %d cells written", stop, n_cells)
        obs.close()
        x.close()
        var = pa.table(
            {
                "soma_joinid": pa.array(np.arange(n_genes), pa.int64()),
                "feature_id": gene_ids(n_genes),
                "feature_name": [f"SYN{j + 1}" for j in range(n_genes)],
                "feature_length": pa.array(np.random.default_rng([seed, 2]).integers(300, 12_000, n_genes), pa.int64()),
                "nnz": pa.array(gene_nnz, pa.int64()),
                "n_measured_obs": pa.array(np.full(n_genes, n_cells), pa.int64()),
            }
        )
        _add_dataframe(rna, "var", var)
    link_experiment(out)
    seconds = time.perf_counter() - started
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    written = {
        "uri": str(out),
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_datasets": n_datasets,
        "nnz": nnz_total,
        "expressed_genes_per_cell": nnz_total / n_cells,
        "disk_bytes": disk,
        "seconds": seconds,
    }
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale synthetic-census`."""
    parser.add_argument("--out", required=True, help="the Census root folder to create")
    add_overwrite(parser, "the synthetic Census at --out")
    parser.add_argument("--cells", type=int, default=200_000, help="cells")
    parser.add_argument("--genes", type=int, default=36_000, help="genes (the Census has ~60k, its VAEs decode 36k)")
    parser.add_argument("--datasets", type=int, default=12, help="source datasets (contiguous blocks of cells)")
    parser.add_argument("--median-library", type=float, default=2_000.0, help="median counts per cell")
    parser.add_argument("--seed", type=int, default=0, help="seed of the design and the counts")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    claim_output(args.out, "a synthetic Census", "--out", args.overwrite, folder=True, marker="census_data")
    with staged(args.out) as root:  # written whole, then renamed into place (its members' URIs are relative)
        written = write_synthetic_census(root, args.cells, args.genes, args.datasets, args.median_library, args.seed)
    written["uri"] = args.out
    print(
        f"wrote {written['uri']}: {written['n_cells']:,} cells x {written['n_genes']:,} genes from "
        f"{written['n_datasets']} datasets, {written['expressed_genes_per_cell']:,.0f} expressed genes per cell, "
        f"{written['disk_bytes'] / 2**20:,.0f} MiB, {written['seconds']:.0f} s"
    )
    print(f"read it with data.source=census data.uri={written['uri']} (X layer raw, var feature_id)")
