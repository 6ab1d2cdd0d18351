"""Embed cells with a trained VAE: the posterior-mean latent tokens of each cell, streamed from an .h5ad of
raw counts or a SOMA experiment into obsm of a new .h5ad (`scldm-scale embed`), or from an in-memory AnnData
into its own obsm (`scldm_scale.embed_cells`).

- The model is a vae or an ldm artifact (the latter holds its VAE); anything else is refused.
- Genes are matched to the model's vocabulary as `data.vocab` matches them: by id (an .h5ad's
  var_names or the var column of ids, feature_id, gene_ids, gene_id or ensembl_id, that matches the most
  vocabulary genes; a SOMA experiment's var feature_id), else by name. Input genes outside the vocabulary
  are dropped. Vocabulary genes missing from the input are an error unless allowed; then they are absent
  tokens: the set encoder sees no token for them, which for a model trained on expressed genes only
  (data.gene_tokens=expressed) is exactly what it sees for a zero count, and for dense /
  expressed_plus_zeros models means they are left out of the zero tokens.
- The encoder tokens follow the model's token policy (its training's data.gene_tokens). expressed_plus_zeros
  draws each cell's zero tokens from a generator seeded by the cell's row in the input, so a cell's embedding
  never depends on the batch it is in; tokens enter in vocabulary order whatever the input's gene order (the encoder is
  permutation invariant, and a fixed order makes it so to the last bit).
- Reading is in row chunks (h5py for .h5ad, X or a layer; SOMA reads for experiments), so large inputs
  stream; encoding is in batches, in eval mode under no_grad, fp32: the same input gives the same output.
- The output holds the input's obs and no genes (n_vars = 0): the embedding is per cell, and a copy of X
  would double the input's size on disk for nothing (join on obs_names to get it back).
  obsm["X_scldm"]: (N, M*L) float32, token-major (column m*L + l is dimension l of latent token m);
  obsm["X_scldm_pooled"]: (N, L) float32, the mean of the M tokens; uns["scldm_embed"]: the settings, with
  n_genes_vocabulary, n_genes_used and n_genes_missing (the model's genes the input lacks).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from scldm_scale import artifact
from scldm_scale.artifact import Artifact
from scldm_scale.config import ConfigError, EmbedConfig, add_options
from scldm_scale.data.batch import EXPRESSED_ONLY, TokenPolicy, canonical_csr, collate_csr, sample_zero_genes
from scldm_scale.data.counts import CONFIG_FIX, RAW_X, DataError, layer_fix, unreadable_h5ad, validate_counts
from scldm_scale.data.vocab import GeneAlignment, GeneVocabulary, align_var
from scldm_scale.models.vae import SetVAE
from scldm_scale.outputs import add_overwrite, claim_output, staged
from scldm_scale.world import resolve_device

log = logging.getLogger(__name__)

EMBED_KEY = "X_scldm"
POOLED_KEY = "X_scldm_pooled"
UNS_KEY = "scldm_embed"
READ_CHUNK_ROWS = 10_000
ZERO_TOKEN_SEED = 0


@dataclass
class Embedder:
    """A model's VAE and what encoding a cell the way it was trained needs."""

    vae: SetVAE
    genes: GeneVocabulary
    policy: TokenPolicy
    allow_non_integer: bool
    checkpoint: str
    kind: str
    device: torch.device
    batch_size: int = EmbedConfig.batch_size

    @classmethod
    def from_artifact(
        cls, model: Artifact | str | Path, device: str = EmbedConfig.device, batch_size: int = EmbedConfig.batch_size
    ) -> Embedder:
        """From a vae or ldm artifact (the latter's VAE), or the folder of one."""
        model = artifact.load(model) if isinstance(model, str | Path) else model
        device_ = resolve_device(device)
        vae = model.vae
        return cls(
            vae=vae.build_vae(device_),
            genes=vae.genes,
            policy=vae.token_policy,
            allow_non_integer=vae.allow_non_integer,
            checkpoint=str(model.source),
            kind=model.kind,
            device=device_,
            batch_size=batch_size,
        )

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.vae.latent_shape

    @torch.no_grad()
    def encode(self, counts: sp.csr_matrix, gene_ids: np.ndarray, first_row: int = 0) -> np.ndarray:
        """Posterior-mean latents (N, M, L) float32 of cells given as CSR rows.

        Column j of `counts` is vocabulary gene gene_ids[j] (ascending); `first_row` is the input row of the
        first cell, which seeds its zero tokens under expressed_plus_zeros. Every cell needs a count > 0.
        """
        counts = canonical_csr(counts)
        policy = self.policy
        if policy.mode == "expressed_plus_zeros" and policy.n_zero_tokens > 0:
            counts = _with_zero_tokens(counts, policy.n_zero_tokens, first_row)
            policy = EXPRESSED_ONLY  # the zero tokens are now stored entries
        m, latent_dim = self.latent_shape
        out = np.empty((counts.shape[0], m, latent_dim), dtype=np.float32)
        data, indices, indptr = counts.data, counts.indices, counts.indptr
        for start in range(0, counts.shape[0], self.batch_size):
            stop = min(start + self.batch_size, counts.shape[0])
            lo, hi = indptr[start], indptr[stop]
            batch = collate_csr(
                data[lo:hi], indices[lo:hi], indptr[start : stop + 1], counts.shape[1], {}, gene_ids, policy
            ).to(self.device)
            z, _ = self.vae.encode(batch.gene_ids, batch.counts, batch.mask, sample=False)  # (B, M, L)
            out[start:stop] = z.float().cpu().numpy()
        return out


def _with_zero_tokens(counts: sp.csr_matrix, n_zero_tokens: int, first_row: int) -> sp.csr_matrix:
    """The cells plus n_zero_tokens of each cell's zero genes as stored zeros, drawn per cell from
    (ZERO_TOKEN_SEED, input row), so the draw does not depend on the batch (collate_csr draws per batch)."""
    n_genes = counts.shape[1]
    rows = []
    for i in range(counts.shape[0]):
        expressed = counts.indices[counts.indptr[i] : counts.indptr[i + 1]]
        rng = np.random.default_rng([ZERO_TOKEN_SEED, first_row + i])
        picked = sample_zero_genes(expressed, n_genes, n_zero_tokens, rng)
        columns = np.concatenate([expressed, picked])
        values = np.concatenate([counts.data[counts.indptr[i] : counts.indptr[i + 1]], np.zeros(len(picked))])
        order = np.argsort(columns)
        rows.append((columns[order], values[order]))
    lengths = [len(c) for c, _ in rows]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([c for c, _ in rows]) if rows else np.zeros(0, dtype=np.int64)
    data = np.concatenate([v for _, v in rows]).astype(np.float32) if rows else np.zeros(0, dtype=np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=counts.shape)  # stored zeros are kept


def align_input(
    var: pd.DataFrame, vocabulary: GeneVocabulary | list[str], where: str, allow_missing_genes: bool
) -> GeneAlignment:
    """An input's genes (an AnnData's var) matched to the vocabulary (`data.vocab.align_var`), checked as
    embed checks them (`check_alignment`)."""
    alignment = align_var(var, vocabulary, where)
    check_alignment(alignment, where, allow_missing_genes)
    return alignment


def check_alignment(alignment: GeneAlignment, where: str, allow_missing_genes: bool) -> None:
    """Input genes outside the vocabulary are dropped (logged); vocabulary genes absent from the input are an
    error unless allow_missing_genes (then a warning: they are absent tokens)."""
    if alignment.extra:
        n_input = len(alignment.extra) + len(alignment.columns)
        log.info("%s: dropping %d of %d genes not in the model's vocabulary", where, len(alignment.extra), n_input)
    if not allow_missing_genes:
        alignment.require_complete(
            where,
            "add them (as zeros if unmeasured) or pass --allow-missing-genes to encode without them (absent tokens)",
        )
    elif alignment.missing:
        log.warning(
            "%s: %d of the model's %d genes are missing; encoding without them",
            where,
            len(alignment.missing),
            alignment.n_vocabulary,
        )


class MatrixCounts:
    """Cells of a row-sliceable counts matrix (in memory, or an h5py / anndata backed dataset) with its obs
    and var, read in row chunks over the vocabulary genes."""

    def __init__(
        self,
        x,
        obs: pd.DataFrame,
        var: pd.DataFrame,
        where: str,
        vocabulary: GeneVocabulary | list[str],
        allow_missing_genes: bool,
        allow_non_integer: bool,
        on_close=None,
        fix: str = CONFIG_FIX,
    ):
        self.where = where
        self.allow_non_integer = allow_non_integer
        self.fix = fix
        self.obs = obs
        self._x = x
        self._on_close = on_close
        alignment = align_input(var, vocabulary, where, allow_missing_genes)
        self._columns, self.gene_ids = alignment.columns, alignment.positions

    @property
    def n_cells(self) -> int:
        return len(self.obs)

    def blocks(self, rows: int = READ_CHUNK_ROWS) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(first row, validated CSR counts over the vocabulary genes present) per chunk of rows."""
        for start in range(0, self.n_cells, rows):
            stop = min(start + rows, self.n_cells)
            block = sp.csr_matrix(self._x[start:stop], dtype=np.float32)[:, self._columns]
            _validate(block, self.where, start, self.allow_non_integer, self.fix)
            yield start, block

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()


def open_h5ad(
    path: Path,
    vocabulary: GeneVocabulary | list[str],
    allow_missing_genes: bool,
    layer: str | None,
    allow_non_integer: bool,
) -> MatrixCounts:
    """The cells of an .h5ad, read in row chunks through h5py (X, or a layer); nothing is loaded whole."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise unreadable_h5ad(path, err) from err
    try:
        if not {"obs", "var"} <= set(f):
            raise unreadable_h5ad(path, ValueError(f"no obs and var groups; its top-level entries are {list(f)}"))
        layers, has_raw = (list(f["layers"]) if "layers" in f else []), "raw" in f and "X" in f["raw"]
        fix = layer_fix(layers, has_raw)
        if layer == RAW_X and not has_raw:
            raise DataError(f"{path}: --layer {RAW_X} but the file has no .raw.X; layers are {layers}")
        if layer not in (None, RAW_X) and layer not in layers:
            raise DataError(f"{path}: no layer {layer!r}; {fix} (omit --layer to use X)")
        if layer is None and "X" not in f:
            raise DataError(f"{path}: X is empty; {fix}")
        group = f["raw"] if layer == RAW_X else f  # .raw has its own X and var
        matrix = group["X"] if layer in (None, RAW_X) else f["layers"][layer]
        x = ad.io.sparse_dataset(matrix) if isinstance(matrix, h5py.Group) else matrix
        try:
            obs, var = ad.io.read_elem(f["obs"]), ad.io.read_elem(group["var"])
        except Exception as err:  # a damaged file or an HDF5 file that is not an AnnData
            raise unreadable_h5ad(path, err) from err
        where = f"{path} ({RAW_X if layer == RAW_X else f'layer {layer!r}' if layer else 'X'})"
        return MatrixCounts(x, obs, var, where, vocabulary, allow_missing_genes, allow_non_integer, f.close, fix)
    except BaseException:
        f.close()
        raise


def in_memory(
    adata: ad.AnnData,
    vocabulary: GeneVocabulary | list[str],
    allow_missing_genes: bool,
    layer: str | None,
    allow_non_integer: bool,
) -> MatrixCounts:
    """The cells of an in-memory AnnData (X, or a layer): the notebook API's input."""
    fix = layer_fix(list(adata.layers), adata.raw is not None, "layer=")
    if layer == RAW_X and adata.raw is None:
        raise DataError(f"the AnnData has no .raw (layer={RAW_X!r}); layers are {list(adata.layers)}")
    if layer not in (None, RAW_X) and layer not in adata.layers:
        raise DataError(f"the AnnData has no layer {layer!r}; {fix} (layer=None uses X)")
    x = adata.raw.X if layer == RAW_X else adata.layers[layer] if layer is not None else adata.X
    var = adata.raw.var if layer == RAW_X else adata.var
    if x is None:
        raise DataError(f"the AnnData's X is empty; {fix}")
    where = "the AnnData" + (f" ({RAW_X})" if layer == RAW_X else f" (layer {layer!r})" if layer else "")
    return MatrixCounts(x, adata.obs, var, where, vocabulary, allow_missing_genes, allow_non_integer, fix=fix)


class SomaCounts:
    """The cells of a SOMA experiment (measurement RNA, X layer counts), genes matched by feature_id."""

    def __init__(
        self, uri: str, vocabulary: GeneVocabulary | list[str], allow_missing_genes: bool, allow_non_integer: bool
    ):
        from scldm_scale.data.soma import SomaCells, SomaSpec, open_experiment

        self.where = uri
        self.allow_non_integer = allow_non_integer
        spec = SomaSpec(uri=uri)
        handle, exp = open_experiment(spec)
        try:
            obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
        finally:
            handle.close()
        self._cells = SomaCells(spec, vocabulary=vocabulary)  # reads the matched genes in vocabulary order
        check_alignment(self._cells.alignment, uri, allow_missing_genes)
        self.gene_ids = self._cells.decode_gene_ids
        index = obs["obs_id"].astype(str) if "obs_id" in obs else obs["soma_joinid"].astype(str)
        self.obs = obs.drop(columns=[c for c in ("obs_id", "soma_joinid") if c in obs]).set_axis(index.to_numpy())

    @property
    def n_cells(self) -> int:
        return len(self.obs)

    def blocks(self, rows: int = READ_CHUNK_ROWS) -> Iterator[tuple[int, sp.csr_matrix]]:
        for start in range(0, self.n_cells, rows):
            block = self._cells.read(np.arange(start, min(start + rows, self.n_cells)))
            _validate(block, self.where, start, self.allow_non_integer)
            yield start, block

    def close(self) -> None:
        """Each read opens and closes the experiment itself."""


def _validate(block: sp.csr_matrix, where: str, start: int, allow_non_integer: bool, fix: str = CONFIG_FIX) -> None:
    try:
        validate_counts(block, where, allow_non_integer, fix)
    except DataError as err:
        raise DataError(f"{err} (in cells {start}..{start + block.shape[0] - 1})") from None


def open_counts(
    data: str | Path | ad.AnnData,
    vocabulary: GeneVocabulary | list[str],
    allow_missing_genes: bool = False,
    layer: str | None = None,
    allow_non_integer: bool = False,
) -> MatrixCounts | SomaCounts:
    """An in-memory AnnData, an .h5ad file or a SOMA experiment (any other path or URI), read over the
    vocabulary's genes."""
    if isinstance(data, ad.AnnData):
        return in_memory(data, vocabulary, allow_missing_genes, layer, allow_non_integer)
    path = Path(data)
    if path.suffix == ".h5ad":
        if not path.is_file():
            raise DataError(f"{path} does not exist")
        return open_h5ad(path, vocabulary, allow_missing_genes, layer, allow_non_integer)
    if layer is not None:
        raise DataError(f"{data}: --layer is for .h5ad inputs; a SOMA experiment is read from its X layer 'counts'")
    return SomaCounts(str(data), vocabulary, allow_missing_genes, allow_non_integer)


def check_expressed(block: sp.csr_matrix, obs_names: pd.Index, start: int, where: str) -> None:
    """Refuse cells with no counts over the model's genes: the set encoder would get no token at all."""
    empty = np.flatnonzero(np.asarray(block.sum(axis=1)).ravel() == 0)
    if empty.size:
        raise DataError(
            f"{where}: {empty.size} cells have zero counts over the model's genes (first: "
            f"{obs_names[start + empty[0]]}); remove them, e.g. sc.pp.filter_cells(adata, min_counts=1)"
        )


def encode_source(embedder: Embedder, source: MatrixCounts | SomaCounts, progress: bool = True) -> np.ndarray:
    """Posterior-mean latents (N, M, L) float32 of every cell of a source, in order, one chunk at a time."""
    m, latent_dim = embedder.latent_shape
    out = np.empty((source.n_cells, m, latent_dim), dtype=np.float32)
    # A context: a refused block closes the bar's line first, so the refusal is a line of its own.
    with tqdm(total=source.n_cells, desc="embed", unit="cell", disable=not progress, dynamic_ncols=True) as bar:
        for start, block in source.blocks():
            check_expressed(block, source.obs.index, start, source.where)
            out[start : start + block.shape[0]] = embedder.encode(block, source.gene_ids, first_row=start)
            bar.update(block.shape[0])
    return out


def embed(
    checkpoint: Artifact | str | Path,
    data: str | Path | ad.AnnData,
    batch_size: int = EmbedConfig.batch_size,
    device: str = EmbedConfig.device,
    allow_missing_genes: bool = EmbedConfig.allow_missing_genes,
    layer: str | None = EmbedConfig.layer,
    progress: bool = True,
) -> ad.AnnData:
    """The cells of `data` with their embeddings in obsm (see the module docstring).

    `checkpoint` is a model artifact or its folder. `data` is an .h5ad path or a SOMA URI (the result is a
    new AnnData with the input's obs and no genes), or an in-memory AnnData, which gets the embeddings in
    its own obsm and is returned.
    """
    embedder = Embedder.from_artifact(checkpoint, device=device, batch_size=batch_size)
    source = open_counts(data, embedder.genes, allow_missing_genes, layer, embedder.allow_non_integer)
    try:
        latents = encode_source(embedder, source, progress)  # (N, M, L)
    finally:
        source.close()
    m, latent_dim = embedder.latent_shape
    out = data if isinstance(data, ad.AnnData) else ad.AnnData(obs=source.obs)
    out.obsm[EMBED_KEY] = latents.reshape(len(latents), m * latent_dim)  # (N, M*L), token-major
    out.obsm[POOLED_KEY] = latents.mean(axis=1)  # (N, L)
    out.uns[UNS_KEY] = {
        "checkpoint": embedder.checkpoint,
        "checkpoint_kind": embedder.kind,
        "input": "in-memory AnnData" if isinstance(data, ad.AnnData) else str(data),
        "n_latent_tokens": m,
        "latent_dim": latent_dim,
        "layout": f"{EMBED_KEY}[:, m * latent_dim + l] is dimension l of latent token m; {POOLED_KEY} is their mean",
        "gene_tokens": embedder.policy.mode,
        "n_genes_vocabulary": len(embedder.genes),
        "n_genes_used": int(len(source.gene_ids)),
        "n_genes_missing": len(embedder.genes) - int(len(source.gene_ids)),
    }
    return out


def add_embed_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `EmbedConfig` (how cells are read and encoded), shared by `embed` and `classify`."""
    add_options(parser, EmbedConfig)


def check_embed_options(args: argparse.Namespace) -> None:
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale embed`."""
    parser.add_argument("checkpoint", metavar="MODEL", help="a vae or ldm model artifact folder")
    parser.add_argument("input", help=".h5ad of raw counts, or a SOMA experiment URI")
    add_embed_options(parser)
    parser.add_argument("--out", required=True, help="output .h5ad: the input's obs, obsm X_scldm and X_scldm_pooled")
    add_overwrite(parser, "the .h5ad at --out")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    check_embed_options(args)
    claim_output(args.out, "the embedding .h5ad", "--out", args.overwrite, folder=False)
    adata = embed(args.checkpoint, args.input, args.batch_size, args.device, args.allow_missing_genes, args.layer)
    with staged(args.out) as target:
        adata.write_h5ad(target)
    shapes = f"obsm {EMBED_KEY} {adata.obsm[EMBED_KEY].shape}, {POOLED_KEY} {adata.obsm[POOLED_KEY].shape}"
    print(f"wrote {adata.n_obs} cells to {args.out}: {shapes}")
