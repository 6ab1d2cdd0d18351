"""`scldm-scale prepare`: cells (h5ad, 10x h5, Matrix Market folder, CSV) -> a TileDB-SOMA Experiment.

The experiment has measurement `RNA` with an integer-count X layer `counts`, var in the Census schema
(`feature_id`: the gene id, Ensembl where the input has it; `feature_name`: the symbol), obs with the
requested label columns, `n_counts` (total counts over the kept genes, used for library-size fits without a
pass over X) and a stratified `split` column (train / val / test).

Genes: `feature_id` comes from var_names or a var column of ids (gene_ids, gene_id, ensembl_id, feature_id),
whichever holds the most Ensembl-looking ids (`--gene-id-column` names it); `feature_name` from the first of
feature_name, gene_symbols, gene_name, else from symbol var_names when the ids came from a column
(`--gene-name-column` names it), else the id. `--genes all|hvg:N|FILE` keeps a subset (`data.genes`).
Raw counts: an .h5ad's X, else a layer named like counts (counts, raw_counts, umi_counts), else `.raw.X`
(with raw.var's genes): the first whose first chunk of cells holds integer counts; the log says which, and
`--layer NAME` (or `--layer raw.X`) chooses.

Everything is validated before anything is written: non-integer, negative, NaN or inf counts, duplicate
gene ids, a missing label column, cells with zero counts (dropped with a count shown, or refused with
`zero_cells="refuse"`). An .h5ad is opened in backed mode, and X is validated and then copied in row
chunks with progress bars, so the whole matrix is never in memory (10x and CSV inputs are read whole by
their readers). Of a 10x input only the Gene Expression features are kept: antibody, CRISPR guide and custom
features are not genes, and are dropped with their number logged. The experiment is written into a
hidden sibling folder and renamed onto URI at the end (outputs.staged), so an interrupted ingestion leaves
nothing half-written at URI, and a partial left by a killed one is removed by the next `prepare` to URI.
URI is checked for writability before the input is read.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from scldm_scale.config import PrepareConfig, add_options, from_flags
from scldm_scale.data.counts import RAW_X, DataError, count_problem, read_h5ad, validate_counts, validate_labels
from scldm_scale.data.genes import select_genes
from scldm_scale.data.split import stratified_split
from scldm_scale.data.vocab import GENE_ID_COLUMNS, GENE_NAME_COLUMNS, GeneVocabulary
from scldm_scale.outputs import claim_output, staged
from scldm_scale.stopping import DeferredInterrupt

log = logging.getLogger(__name__)

MEASUREMENT = "RNA"
X_LAYER = "counts"
SPLIT_COLUMN = "split"
VALIDATE_CHUNK_ROWS = 10_000
# Layers tried for raw counts after X, in order; `RAW_X` names .raw.X (tried last).
COUNT_LAYERS = ("counts", "raw_counts", "umi_counts")
INDEX = "index"  # --gene-id-column / --gene-name-column value naming var_names
ENSEMBL_GENE_ID = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def read_input(path: str | Path) -> ad.AnnData:
    """Open an input file; .h5ad stays backed (on disk) so large files are never loaded whole here."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    import scanpy as sc

    if path.is_dir():
        if not any(p.name.startswith("matrix.mtx") for p in path.iterdir()):
            raise DataError(f"{path} is a folder without matrix.mtx(.gz): expected a 10x Matrix Market folder")
        try:
            mtx = sc.read_10x_mtx(path, var_names="gene_ids", gex_only=False)
        except Exception as err:  # scanpy's FileNotFoundError for a missing part, pandas' and scipy's parse errors
            raise DataError(
                f"{path}: cannot read as a 10x Matrix Market folder ({err}); it needs matrix.mtx.gz, barcodes.tsv.gz "
                "and features.tsv.gz (CellRanger v3), or matrix.mtx, barcodes.tsv and genes.tsv (v2)"
            ) from err
        adata = _gene_expression_only(mtx, path)
    elif path.suffix == ".h5ad":
        adata = read_h5ad(path, backed="r")
    elif path.suffix == ".h5":
        adata = _gene_expression_only(_read_10x_h5(path), path)
    elif path.suffix in (".csv", ".gz") and path.name.endswith((".csv", ".csv.gz")):
        try:
            frame = pd.read_csv(path, index_col=0)
            x = sp.csr_matrix(frame.to_numpy(dtype=np.float64))
        except Exception as err:  # a malformed file, non-numeric counts, a damaged .gz
            raise DataError(
                f"{path}: cannot read as a cells x genes CSV of counts ({err}); the first column must hold the "
                "cell ids, the first row the gene ids, every other entry a number"
            ) from err
        adata = ad.AnnData(X=x, obs=pd.DataFrame(index=frame.index))
        adata.var_names = frame.columns.astype(str)
    else:
        raise DataError(
            f"{path}: unsupported input; use .h5ad, a 10x .h5, a Matrix Market folder or a cells x genes CSV"
        )
    return adata


def _read_10x_h5(path: Path) -> ad.AnnData:
    """A CellRanger .h5 (v3+ `matrix` group, or v2 genome groups) with gene ids as var_names, symbols kept."""
    import h5py
    import scanpy as sc

    try:
        with h5py.File(path, "r") as f:
            entries = list(f)
            v2_genomes = [k for k in entries if isinstance(f[k], h5py.Group) and "gene_names" in f[k]]
    except OSError as err:
        raise DataError(f"{path}: not an HDF5 file ({err}); expected a 10x .h5 written by CellRanger") from None
    if "matrix" not in entries and not v2_genomes:
        raise DataError(
            f"{path}: not a 10x .h5: no 'matrix' group (CellRanger v3+) and no genome group with gene_names "
            f"(CellRanger v2); its top-level entries are {entries}. An AnnData file must be named .h5ad"
        )
    try:
        adata = sc.read_10x_h5(path, gex_only=False)
    except Exception as err:  # scanpy raises a bare Exception for a missing dataset, the KeyError as its cause
        cause = f" {err.__cause__!r}" if err.__cause__ is not None else ""
        raise DataError(f"{path}: cannot read as a 10x .h5: {err}{cause}") from err
    # scanpy names features by symbol, which need not be unique; the gene id is the identity.
    adata.var["gene_symbols"] = adata.var_names.to_numpy()
    adata.var_names = adata.var["gene_ids"].astype(str).to_numpy()
    return adata


def _gene_expression_only(adata: ad.AnnData, where: Path) -> ad.AnnData:
    """The Gene Expression features of a 10x input (CellRanger v2 inputs have genes only)."""
    if "feature_types" not in adata.var:
        return adata
    types = adata.var["feature_types"].astype(str)
    keep = (types == "Gene Expression").to_numpy()
    if keep.all():
        return adata
    dropped = ", ".join(f"{n} {kind}" for kind, n in types[~keep].value_counts().items())
    log.info("%s: dropping %d features that are not Gene Expression (%s)", where, int((~keep).sum()), dropped)
    return adata[:, keep].copy()


@dataclass
class Counts:
    """Where an input's raw counts are: the matrix (backed or in memory), the var of its genes, its name."""

    matrix: Any
    var: pd.DataFrame
    name: str


def find_counts(adata: ad.AnnData, layer: str | None, where: str, allow_non_integer: bool = False) -> Counts:
    """The named layer (or raw.X), else the first of X, the COUNT_LAYERS and raw.X whose first chunk of cells
    is counts (`count_problem`); an error that lists what was looked at when none is."""
    layers = list(adata.layers)
    if layer == RAW_X:
        if adata.raw is None:
            raise DataError(f"{where}: --layer raw.X but the input has no .raw")
        return Counts(adata.raw.X, adata.raw.var, RAW_X)
    if layer is not None:
        if layer not in adata.layers:
            raise DataError(f"{where}: no layer {layer!r}; layers are {layers} (omit --layer to detect the counts)")
        return Counts(adata.layers[layer], adata.var, f"layers[{layer!r}]")
    candidates = [Counts(adata.X, adata.var, "X")] if adata.X is not None else []
    candidates += [Counts(adata.layers[k], adata.var, f"layers[{k!r}]") for k in COUNT_LAYERS if k in adata.layers]
    if adata.raw is not None:
        candidates.append(Counts(adata.raw.X, adata.raw.var, RAW_X))
    looked = []
    for candidate in candidates:
        block = candidate.matrix[: min(VALIDATE_CHUNK_ROWS, adata.n_obs)]
        problem = count_problem(sp.csr_matrix(block) if not isinstance(block, np.ndarray) else block, allow_non_integer)
        if problem is None:
            if candidate.name != "X" or looked:
                log.info("%s: raw counts from %s (%s)", where, candidate.name, "; ".join(looked) or "no X")
            else:
                log.info("%s: raw counts from X", where)
            return candidate
        looked.append(f"{candidate.name} has {problem}")
    tried = {"X", *COUNT_LAYERS, RAW_X}
    others = [k for k in layers if k not in tried]
    raise DataError(
        f"{where}: found no raw integer counts; looked at X, layers {list(COUNT_LAYERS)} and .raw.X: "
        + ("; ".join(looked) if looked else "none of them exists")
        + f". Its layers are {layers}"
        + (f" ({others} not tried)" if others else "")
        + ". Pass --layer NAME (a layer, or raw.X) to choose the counts, or --allow-non-integer if the values "
        "are deliberately non-integer"
    )


def _is_ensembl(ids: np.ndarray) -> float:
    """The fraction of ids that look like Ensembl gene ids (ENSG00000141510, ENSMUSG..., with a version)."""
    return float(np.mean([bool(ENSEMBL_GENE_ID.match(g)) for g in ids])) if len(ids) else 0.0


def gene_schema(
    var: pd.DataFrame, where: str, id_column: str | None = None, name_column: str | None = None
) -> pd.DataFrame:
    """The Census gene columns of an input's var: feature_id and feature_name, indexed by feature_id (see the
    module docstring; `id_column` / `name_column` are var columns or INDEX, None detects)."""
    columns = {INDEX: var.index.astype(str).to_numpy()} | {c: var[c].astype(str).to_numpy() for c in var.columns}

    def named(column: str, flag: str) -> np.ndarray:
        if column not in columns:
            raise DataError(f"{where}: {flag} {column!r} is not a var column; var has {list(var.columns)} (or index)")
        return columns[column]

    if id_column is None:
        candidates = [INDEX, *(c for c in GENE_ID_COLUMNS if c in columns)]
        ensembl = [_is_ensembl(columns[c]) for c in candidates]
        id_column = candidates[int(np.argmax(ensembl))]  # var_names unless a column holds more Ensembl ids
    ids = named(id_column, "--gene-id-column")
    if name_column is None:
        name_column = next((c for c in GENE_NAME_COLUMNS if c in columns), None)
        if name_column is None and id_column != INDEX and _is_ensembl(columns[INDEX]) == 0:
            name_column = INDEX  # ids from a column, symbols as var_names (scanpy's read_10x_* default)
    names = named(name_column, "--gene-name-column") if name_column is not None else ids
    log.info(
        "%s: feature_id from %s, feature_name from %s",
        where,
        "var_names" if id_column == INDEX else f"var[{id_column!r}]",
        "var_names" if name_column == INDEX else f"var[{name_column!r}]" if name_column else "feature_id",
    )
    return pd.DataFrame({"feature_id": ids, "feature_name": names}, index=pd.Index(ids))


def _source_ranges(rows: np.ndarray):
    """(lo, hi, positions of `rows` in [lo, hi)) over contiguous source ranges of VALIDATE_CHUNK_ROWS rows that
    hold some of the ascending `rows`: a sparse subsample never reads a range wider than one chunk."""
    for lo in range(int(rows[0]), int(rows[-1]) + 1, VALIDATE_CHUNK_ROWS):
        hi = lo + VALIDATE_CHUNK_ROWS
        inside = np.flatnonzero((rows >= lo) & (rows < hi))
        if len(inside):
            yield lo, min(hi, int(rows[inside[-1]]) + 1), inside


def read_rows(x, rows: np.ndarray, where: str, allow_non_integer: bool) -> sp.csr_matrix:
    """Validated CSR counts of the cells at ascending `rows` of a (backed) matrix, read in row chunks."""
    blocks = []
    for lo, hi, inside in _source_ranges(rows):
        block = sp.csr_matrix(x[lo:hi])[rows[inside] - lo]
        validate_counts(block, where, allow_non_integer)
        blocks.append(_as_counts(block, allow_non_integer))
    return sp.vstack(blocks, format="csr")


def scan_counts(x, n_cells: int, columns: np.ndarray | None, where: str, allow_non_integer: bool = False) -> np.ndarray:
    """Validate the matrix chunk by chunk; return each cell's total count over `columns` (None: all genes)."""
    totals = np.empty(n_cells, dtype=np.float64)
    for start in tqdm(range(0, n_cells, VALIDATE_CHUNK_ROWS), desc="validate", unit="chunk", leave=False):
        stop = min(start + VALIDATE_CHUNK_ROWS, n_cells)
        block = x[start:stop]
        block = sp.csr_matrix(block) if not isinstance(block, np.ndarray) else block
        try:
            validate_counts(block, where, allow_non_integer)
        except DataError as err:
            raise DataError(f"{err} (cells {start}..{stop - 1})") from None
        kept = _as_counts(block, allow_non_integer)
        kept = kept if columns is None else kept[:, columns]
        totals[start:stop] = np.asarray(kept.sum(axis=1)).ravel()
    return totals


def _as_counts(block, allow_non_integer: bool) -> sp.csr_matrix:
    """A validated block as CSR: float32 when non-integer values are allowed, else rounded int32 (validation
    accepts values within 1e-6 of an integer, and a plain cast would truncate 2.9999999 to 2)."""
    block = sp.csr_matrix(block, dtype=np.float64)
    if allow_non_integer:
        return sp.csr_matrix(block, dtype=np.float32)
    block.data = np.rint(block.data)
    return sp.csr_matrix(block, dtype=np.int32)


def _write_experiment(
    uri: Path,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    x,
    rows: np.ndarray,
    columns: np.ndarray | None,
    allow_non_integer: bool,
    append: bool,
    between_chunks: Callable[[], None] = lambda: None,
) -> None:
    """obs/var via tiledbsoma.io, then X's `rows` x `columns` (None: all) written in row chunks (never the whole
    matrix in memory); `between_chunks()` runs after obs/var and after each chunk.

    append: uri already holds an experiment; tiledbsoma's registration assigns the new cells joinids after
    the existing ones and the new genes joinids after the existing vocabulary (the union, new genes last).
    """
    import pyarrow as pa
    import tiledbsoma
    import tiledbsoma.io

    meta = ad.AnnData(obs=obs, var=var)
    ids = {"obs_id_name": "obs_id", "var_id_name": "var_id"}
    if append:
        try:
            mapping = tiledbsoma.io.register_anndatas(
                str(uri), [meta], measurement_name=MEASUREMENT, obs_field_name="obs_id", var_field_name="var_id"
            )
        except Exception as err:  # duplicate cell ids, schema mismatches, ...
            raise DataError(f"cannot append to {uri.name}: {err}") from None
        mapping.prepare_experiment(str(uri))
        tiledbsoma.io.from_anndata(str(uri), meta, MEASUREMENT, registration_mapping=mapping, **ids)
        joinids = mapping.id_mappings_for_anndata(meta)
        obs_joinids = np.asarray(joinids.obs_axis.data, dtype=np.int64)
        var_joinids = np.asarray(joinids.var_axes[MEASUREMENT].data, dtype=np.int64)
    else:
        tiledbsoma.io.from_anndata(str(uri), meta, MEASUREMENT, **ids)
        obs_joinids, var_joinids = np.arange(len(rows)), np.arange(len(var))
    between_chunks()
    value_type = pa.float32() if allow_non_integer else pa.int32()
    with tiledbsoma.Experiment.open(str(uri), "w") as exp:
        if append:
            layer = exp.ms[MEASUREMENT].X[X_LAYER]
        else:
            layer = exp.ms[MEASUREMENT].X.add_new_sparse_ndarray(X_LAYER, type=value_type, shape=(len(rows), len(var)))
        written = 0
        for start in tqdm(range(0, len(rows), VALIDATE_CHUNK_ROWS), desc="write", unit="chunk", leave=False):
            chunk_rows = rows[start : start + VALIDATE_CHUNK_ROWS]
            # Read the contiguous source range covering the kept rows, then keep those rows.
            lo, hi = int(chunk_rows[0]), int(chunk_rows[-1]) + 1
            block = _as_counts(x[lo:hi], allow_non_integer)[chunk_rows - lo]
            block = (block if columns is None else block[:, columns]).tocoo()
            layer.write(
                pa.Table.from_pydict(
                    {
                        "soma_dim_0": obs_joinids[block.row + written],
                        "soma_dim_1": var_joinids[block.col],
                        "soma_data": block.data,
                    }
                )
            )
            written += len(chunk_rows)
            between_chunks()


class TileDBWrites(DeferredInterrupt):
    """Ctrl-C while tiledbsoma writes, raised between chunks (seen with tiledbsoma 2.3: a KeyboardInterrupt
    raised inside its native calls can crash the process with a segfault, leaving the partial behind). Once
    TileDB has installed its own SIGINT handler, Ctrl-C cancels the running query with "Query cancelled"
    instead: that becomes a KeyboardInterrupt too, so the staged output is removed as after any other failure."""

    def __exit__(self, kind, error, trace) -> None:
        super().__exit__(kind, error, trace)
        if kind is not None and issubclass(kind, Exception) and "Query cancelled" in str(error):
            raise KeyboardInterrupt from error


def _existing_labels(uri: Path) -> list[str]:
    import tiledbsoma

    with tiledbsoma.Experiment.open(str(uri)) as exp:
        return [c for c in exp.obs.schema.names if c not in ("soma_joinid", "obs_id", "n_counts", SPLIT_COLUMN)]


def prepare(
    input_path: str | Path,
    out_uri: str | Path,
    layer: str | None = PrepareConfig.layer,
    labels: list[str] | tuple[str, ...] = (),
    test_fraction: float = PrepareConfig.test_fraction,
    val_fraction: float = PrepareConfig.val_fraction,
    seed: int = PrepareConfig.seed,
    zero_cells: str = PrepareConfig.zero_cells,
    allow_non_integer: bool = PrepareConfig.allow_non_integer,
    overwrite: bool = PrepareConfig.overwrite,
    append: bool = PrepareConfig.append,
    genes: str = PrepareConfig.genes,
    gene_id_column: str | None = PrepareConfig.gene_id_column,
    gene_name_column: str | None = PrepareConfig.gene_name_column,
) -> Path:
    """Ingest one input into a new SOMA experiment at out_uri (or append it to one); return its path.

    Appending works on a copy of the experiment that replaces the original only when complete, so an
    interrupted append leaves the original untouched (at the cost of one copy of the experiment).
    """
    out = Path(out_uri)
    if append and overwrite:
        raise DataError("--append and --overwrite exclude each other")
    if append and not out.exists():
        raise DataError(f"{out} does not exist: there is no experiment to append to (drop --append to create it)")
    also = ", or --append to add these cells to it"
    claim_output(out, "a SOMA experiment", "--out", overwrite or append, folder=True, marker="ms", also=also)
    if append and sorted(_existing_labels(out)) != sorted(labels):
        raise DataError(
            f"{out} has label columns {_existing_labels(out)}; appended data must bring the same (--labels)"
        )
    if zero_cells not in ("drop", "refuse"):
        raise DataError(f"zero_cells must be 'drop' or 'refuse', got {zero_cells!r}")
    if not (0 <= test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise DataError("test and val fractions must be in [0, 1) and sum to less than 1")
    where = str(input_path)
    adata = read_input(input_path)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(f"{where}: empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    missing = [k for k in labels if k not in adata.obs]
    if missing:
        raise DataError(f"{where}: label columns {missing} are not in obs; obs has {list(adata.obs)}")
    validate_labels(adata.obs, labels, where)
    counts = find_counts(adata, layer, where, allow_non_integer)
    var = gene_schema(counts.var, where, gene_id_column, gene_name_column)
    if not var.index.is_unique:
        dup = var.index[var.index.duplicated()].unique().tolist()[:5]
        raise DataError(
            f"{where}: duplicate gene ids, e.g. {dup}; make them unique first (or name another column with "
            "--gene-id-column)"
        )
    x = counts.matrix
    columns = select_genes(
        genes,
        GeneVocabulary(var["feature_id"].tolist(), var["feature_name"].tolist()),
        adata.n_obs,
        lambda picked: read_rows(x, picked, where, allow_non_integer),
        seed,
        where,
    )
    if len(columns) == len(var):
        columns = None  # every gene: no column gather per chunk
    else:
        var = var.iloc[columns]
    totals = scan_counts(x, adata.n_obs, columns, where, allow_non_integer)
    keep = totals > 0
    if not keep.all():
        n_zero = int((~keep).sum())
        over = "" if columns is None else f" over the {len(columns)} kept genes"
        if zero_cells == "refuse":
            raise DataError(f"{where}: {n_zero} cells have zero counts{over}; drop them or pass --zero-cells drop")
        log.warning("%s: dropping %d cells with zero counts%s", where, n_zero, over)

    # From here on the data is valid: obs/var in memory, X copied in row chunks.
    rows = np.flatnonzero(keep)
    obs = adata.obs.iloc[rows][list(labels)].copy() if labels else pd.DataFrame(index=adata.obs_names[rows])
    for key in labels:
        obs[key] = obs[key].astype(str)
    obs["n_counts"] = totals[rows]
    strata = obs[labels[0]].to_numpy() if labels else np.zeros(len(rows), dtype=str)
    obs[SPLIT_COLUMN] = stratified_split(strata, test_fraction, seed, val_fraction).astype(str)
    obs.index = obs.index.astype(str)
    try:
        with staged(out) as exp, TileDBWrites() as interrupt:
            if append:
                shutil.copytree(out, exp)
            _write_experiment(exp, obs, var, x, rows, columns, allow_non_integer, append, interrupt.check)
    finally:
        if getattr(adata, "isbacked", False):
            adata.file.close()
    log.info("%s %d cells x %d genes to %s", "appended" if append else "wrote", len(rows), len(var), out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale prepare`; the options are views of `PrepareConfig`."""
    parser.add_argument("input", help=".h5ad, 10x .h5, Matrix Market folder or CSV of raw counts")
    parser.add_argument("--out", required=True, help="URI (folder) of the new SOMA experiment")
    add_options(parser, PrepareConfig)
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    out = prepare(args.input, args.out, **asdict(from_flags(PrepareConfig, args)))
    print(f"SOMA experiment: {out}  (train with data.uri={out})")
