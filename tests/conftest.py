"""Shared fixtures: one torch thread, tiny model sizes, seeded synthetic counts (also as SOMA), the built-in dataset."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

# Small enough that a training step takes milliseconds on one CPU core.
TINY_OVERRIDES = (
    "model.d_model=16",
    "model.n_heads=2",
    "model.n_cross_heads=2",
    "model.n_layers=1",
    "model.n_latent_tokens=4",
    "model.latent_dim=8",
    "model.mlp_ratio=2.0",
    "prior.d_model=32",
    "prior.n_heads=2",
    "prior.n_layers=1",
    "train.batch_size=32",
    "train.progress=false",
    "train.log_every=1",
    "train.device=cpu",
    "logging.wandb.mode=disabled",
)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # Every tensor in this suite is tiny: with several OpenMP threads on a busy 2-core machine the
    # thread synchronisation costs ~100x the arithmetic (7 ms instead of 80 us per LayerNorm). No test
    # result depends on the thread count.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_overrides() -> tuple[str, ...]:
    """Dot-list overrides for a tiny VAE and prior (add train.max_steps and paths per test)."""
    return TINY_OVERRIDES


def make_counts_adata(n_cells: int = 120, n_genes: int = 50, n_types: int = 3, seed: int = 0) -> ad.AnnData:
    """NB counts with a different mean profile per cell type (obs['cell_type']), no empty cells."""
    rng = np.random.default_rng(seed)
    type_of_cell = np.arange(n_cells) % n_types
    profiles = rng.gamma(shape=0.5, scale=8.0, size=(n_types, n_genes))  # (T, G) mean counts, very uneven
    size_factors = rng.lognormal(0.0, 0.3, size=(n_cells, 1))  # (N, 1)
    mu = profiles[type_of_cell] * size_factors  # (N, G)
    theta = 3.0
    counts = rng.negative_binomial(theta, theta / (theta + mu))  # numpy's NB(n, p) has mean n (1 - p) / p = mu
    counts[counts.sum(axis=1) == 0, 0] = 1
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type_{t}" for t in type_of_cell])},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


@pytest.fixture
def counts_adata() -> Callable[..., ad.AnnData]:
    """Factory: make_counts_adata(n_cells=120, n_genes=50, n_types=3, seed=0)."""
    return make_counts_adata


@pytest.fixture(scope="session")
def synthetic_h5ad(tmp_path_factory) -> Path:
    """120 cells x 50 genes of NB counts, 3 cell types in obs['cell_type'], written once per session."""
    path = tmp_path_factory.mktemp("synthetic") / "cells.h5ad"
    make_counts_adata().write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def _builtin_adata() -> ad.AnnData:
    from scldm_scale.data.counts import load_builtin

    return load_builtin("pbmc68k_reduced")


@pytest.fixture
def builtin_adata(_builtin_adata) -> ad.AnnData:
    """A fresh copy of the recovered pbmc68k_reduced counts (loaded once per session)."""
    return _builtin_adata.copy()


MARKER_GENE = "cell_marker"


def make_marked_counts_adata(n_cells: int = 120, n_genes: int = 50, n_types: int = 3, seed: int = 0) -> ad.AnnData:
    """make_counts_adata plus a last gene MARKER_GENE whose count in row i is i + 1, so a batch row names its cell."""
    adata = make_counts_adata(n_cells, n_genes, n_types, seed)
    marker = sp.csr_matrix(np.arange(1, n_cells + 1, dtype=np.float32)[:, None])  # (N, 1)
    var = pd.DataFrame(index=[*adata.var_names, MARKER_GENE])
    return ad.AnnData(X=sp.hstack([adata.X, marker], format="csr"), obs=adata.obs.copy(), var=var)


@pytest.fixture
def marked_counts_adata() -> Callable[..., ad.AnnData]:
    """Factory: make_marked_counts_adata(n_cells=120, n_genes=50, n_types=3, seed=0)."""
    return make_marked_counts_adata


@dataclass(frozen=True)
class SomaExperiment:
    """A SOMA experiment laid out like `scldm-scale prepare` writes it, and the arrays it was written from."""

    uri: str
    counts: np.ndarray  # (N, G) float32, row i is the cell with soma_joinid i
    gene_ids: list[str]  # feature_id of var soma_joinid 0..G-1; the last is MARKER_GENE
    cell_type: np.ndarray  # (N,) str
    split: np.ndarray  # (N,) "train" / "test"

    @property
    def marker_column(self) -> int:
        return self.gene_ids.index(MARKER_GENE)


@pytest.fixture(scope="session")
def soma_experiment(tmp_path_factory) -> SomaExperiment:
    """400 cells x 41 genes (40 NB + MARKER_GENE) in measurement RNA, layer counts; every 5th cell is 'test'.

    Written with tiledbsoma directly (not with `prepare`), so loader tests do not depend on ingestion.
    """
    import tiledbsoma.io

    adata = make_marked_counts_adata(n_cells=400, n_genes=40, seed=1)
    n_cells = adata.n_obs
    split = np.where(np.arange(n_cells) % 5 == 4, "test", "train")
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(np.float64)
    adata.obs["split"] = split
    adata.var["feature_id"] = adata.var_names.to_numpy()
    adata.var["feature_name"] = adata.var_names.to_numpy()
    uri = str(tmp_path_factory.mktemp("soma") / "cells.soma")
    adata.X = sp.csr_matrix(adata.X, dtype=np.int32)
    tiledbsoma.io.from_anndata(uri, adata, "RNA", X_layer_name="counts", obs_id_name="obs_id", var_id_name="var_id")
    return SomaExperiment(
        uri=uri,
        counts=adata.X.toarray().astype(np.float32),
        gene_ids=adata.var_names.tolist(),
        cell_type=adata.obs["cell_type"].to_numpy(dtype=str),
        split=split,
    )
