"""scldm-scale: single-cell latent diffusion models (a set VAE over genes + a DiT prior), trained at scale.

The package, by floor (each imports only from the floors below it):
- `stopping` (Ctrl-C held back, the exit at once), `config` (typed schemas), `world` (rank / world size),
  `hardware` (GPU peak FLOP/s and bandwidth);
- `data/` (prepare -> SOMA loader, gene vocabulary, batches), `models/` (VAE, DiT, interpolant, samplers);
- `artifact` (the exported model folder: config.json + model.safetensors + model card);
- `train/` (one trainer over single / DDP / FSDP2 / DeepSpeed, training checkpoints, export);
- inference, which never imports `train`: `generate`, `evaluate/` (metrics, embed, classify), and `api`;
- `bench/`, `plan`, `profile`, `quickstart`, and `cli` on top.

The notebook API is importable from here (loaded on first use, so `import scldm_scale` stays cheap):
`load_model(folder)`, `embed_cells(model, adata)`, `generate_cells(model, conditions, n_cells, guidance)`.
"""

__all__ = ["load_model", "embed_cells", "generate_cells"]


def __getattr__(name: str):
    if name in __all__:
        from scldm_scale import api

        return getattr(api, name)
    raise AttributeError(f"module 'scldm_scale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
