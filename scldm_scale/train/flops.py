"""Training FLOPs per cell and MFU: what the models report, times the cost of a training step, over the peak.

Each model counts its own forward FLOPs per cell (`SetVAE.forward_flops`, `DiT.forward_flops`; the counting
convention is in models/cost.py: matmuls only, 2 FLOPs per multiply-add); the GPU peaks are hardware.py's table.

One training step costs 3x the forward pass (TRAIN_FLOPS_FACTOR): the backward computes the gradients with
respect to both the activations and the weights, each as many FLOPs as the forward. (It is slightly less
where an input needs no gradient, the DiT's projections of the latents and of the timestep features: 2.94x
forward at width 32, 2.998x at width 768.) Recomputation under activation checkpointing is not counted: MFU
measures useful work, so checkpointing lowers MFU, as it should.
"""

from __future__ import annotations

import torch

from scldm_scale.config import Config, PriorConfig, VAEConfig
from scldm_scale.hardware import lookup_peak_tflops
from scldm_scale.models.dit import DiT
from scldm_scale.models.vae import SetVAE

TRAIN_FLOPS_FACTOR = 3


def vae_forward_flops(cfg: VAEConfig, n_genes: int, tokens_per_cell: int, batch_size: int) -> float:
    """Forward FLOPs per cell of a SetVAE (built on the meta device) encoding S tokens and decoding G genes."""
    with torch.device("meta"):
        return SetVAE(cfg, n_genes).forward_flops(tokens_per_cell, n_genes, batch_size)


def dit_forward_flops(cfg: PriorConfig, n_tokens: int, token_dim: int) -> float:
    """Forward FLOPs per cell of the DiT (built on the meta device) on M latent tokens of width L."""
    with torch.device("meta"):
        return DiT(cfg, n_tokens, token_dim, n_classes={}).forward_flops()  # class tables are lookups


def train_flops_per_cell(cfg: Config, n_genes: int, tokens_per_cell: int) -> float:
    """Training FLOPs per cell of the model the config's stage trains (3x its forward).

    stage=ldm trains the DiT on the VAE's M x L latents (model.n_latent_tokens x model.latent_dim); the
    frozen VAE encodes the cells once before training, which is not part of the step.
    """
    if cfg.stage == "vae":
        forward = vae_forward_flops(cfg.model, n_genes, tokens_per_cell, cfg.train.batch_size)
    else:
        forward = dit_forward_flops(cfg.prior, cfg.model.n_latent_tokens, cfg.model.latent_dim)
    return TRAIN_FLOPS_FACTOR * forward


def peak_tflops(device: torch.device | str | None, override: float | None = None) -> float | None:
    """train.peak_tflops when set, else the table's value for a CUDA device; None on CPU or unknown GPUs."""
    if override is not None:
        return override
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return lookup_peak_tflops(torch.cuda.get_device_name(device))


def mfu(flops_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak; None without a peak."""
    if peak_tflops is None or peak_tflops <= 0:
        return None
    return flops_per_s / (peak_tflops * 1e12)
