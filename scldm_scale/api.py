"""The notebook API: load a model artifact, embed an in-memory AnnData, generate cells.

    import scldm_scale
    model = scldm_scale.load_model("runs/pbmc/ldm-model")       # a vae or ldm artifact folder
    scldm_scale.embed_cells(model, adata)                       # adata.obsm["X_scldm"], ["X_scldm_pooled"]
    cells = scldm_scale.generate_cells(model, {"cell_type": "B cell"}, n_cells=200, guidance={"cell_type": 2.0})

The CLI commands `embed` and `generate` run the same functions (`evaluate.embed.embed`,
`generate.generate`); these wrappers only take what a notebook holds (AnnData, dicts) instead of paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad

from scldm_scale import artifact
from scldm_scale.artifact import Artifact, LDMArtifact
from scldm_scale.config import SampleConfig
from scldm_scale.evaluate.embed import embed
from scldm_scale.generate import generate


def load_model(path: str | Path) -> Artifact:
    """A model artifact folder (`<ckpt_dir>/vae-model`, `<ckpt_dir>/ldm-model` or an exported one)."""
    return artifact.load(path)


def embed_cells(
    model: Artifact | str | Path,
    adata: ad.AnnData,
    layer: str | None = None,
    allow_missing_genes: bool = False,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
) -> ad.AnnData:
    """Add the VAE's posterior-mean latents of each cell of `adata` (raw counts in X or `layer`) to its obsm
    (`X_scldm`: (N, M*L) token-major; `X_scldm_pooled`: (N, L) the mean token) and return `adata`.

    Genes are matched to the model's vocabulary by id (var_names or a var column of ids), else by name.
    """
    return embed(model, adata, batch_size, device, allow_missing_genes, layer, progress)


def generate_cells(
    model: LDMArtifact | str | Path,
    conditions: Mapping[str, str] | Sequence[tuple[Mapping[str, str], int]] | None = None,
    n_cells: int = 100,
    guidance: Mapping[str, float] | None = None,
    sampler: SampleConfig | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> ad.AnnData:
    """Generated cells as an AnnData: integer counts in X, the condition labels in obs, the genes in var.

    `conditions` is one condition ({"cell_type": "B cell"}; `n_cells` cells), a list of (condition,
    n_cells) requests, or None for unconditional cells. `guidance` gives each condition key its
    classifier-free guidance weight (default 1: plain conditioning); `sampler` the ODE solver settings.
    """
    if conditions is None:
        requests = [({}, n_cells)]
    elif isinstance(conditions, Mapping):
        requests = [(dict(conditions), n_cells)]
    else:
        requests = [(dict(c), int(n)) for c, n in conditions]
    return generate(model, requests, dict(guidance or {}), sampler, seed=seed, device=device, progress=progress)
