"""Analytic FLOP counts of the two models, peak throughput of known GPUs, and MFU.

Convention (PaLM appendix B, Kaplan et al. 2020): only matrix multiplications count, 2 FLOPs per
multiply-add, including attention's score (Q K^T) and value (P V) products; elementwise work
(LayerNorm, SiLU, softmax, the NB log-likelihood) is left out. A linear layer on T tokens is
2 T d_in d_out; attention of Q queries over K keys at width D (all heads) is 2 Q K D + 2 Q K D.

One training step costs 3x the forward pass (TRAIN_FLOPS_FACTOR): the backward computes the
gradients with respect to both the activations and the weights, each as many FLOPs as the forward.
(It is slightly less where an input needs no gradient, the DiT's projections of the latents and of
the timestep features: 2.94x forward at width 32, 2.998x at width 768.) Recomputation under activation checkpointing is
not counted: MFU measures useful work, so checkpointing lowers MFU, as it should.

Per cell, with E = d_model, H = SwiGLU hidden width (mlp_ratio E rounded up to a multiple of 8),
S = encoder tokens per cell (padded length of the batch), G = decoded genes, M = latent tokens,
L = latent width, n = n_layers:

  VAE forward = [2 S (E+1) E if input_embedding=concat]
              + MCAB(M queries, S keys)                       pooling
              + 2n (8 M E^2 + 4 M^2 E + 6 M E H)              self-attention blocks, encoder + decoder
              + 2 M E L' + 2 M L E                            to / from the latent (L' = 2L if gaussian)
              + MCAB(G queries, M keys)                       unpooling
              + 2 G E (x2 if theta_mode=cell)                 the per-gene head
  MCAB(Q, K)  = 2 Q E^2 / B + 4 K E^2 + 4 Q K E + 2 Q E^2 + 6 Q E H
  (the query projection is made once per batch of B cells: its queries, the inducing points or the
  gene embeddings, are shared by every cell)

  DiT forward = 2 (256 D + D^2) + 2 M L D + 2 D (2D) + 2 M D L
              + n (12 D^2 + 8 M D^2 + 4 M^2 D + 4 M D F)       F = int(mlp_ratio D), D = prior.d_model

The DiT's adaLN modulation (12 D^2 per block) is per cell, not per token: the conditioning vector is
one per cell. Class embeddings are lookups (no FLOPs).
"""

from __future__ import annotations

import re

import torch

from scldm_scale.config import Config, PriorConfig, VAEConfig
from scldm_scale.models.dit import TIME_FREQUENCIES
from scldm_scale.models.mcab import swiglu_hidden_dim

TRAIN_FLOPS_FACTOR = 3

# Peak dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s with fp32 accumulation, as PyTorch's bf16
# matmuls run. Matched in order against torch.cuda.get_device_name(), so specific names come first
# ("H100 NVL" before "H100", "A100" before "A10", "L40S" before "L40" before "L4").
# Sources: NVIDIA datasheets (H100, H200, A100, L4, L40S, L40, A10, A40, A30), the Ada and Ampere GA102
# architecture whitepapers (GeForce: the fp32-accumulate rate, half the fp16-accumulate one), Baseten's
# A10 vs A10G comparison (A10G: 70), the V100 datasheet (no bf16: its fp16 tensor rate), the B200
# product page (HGX B200 per GPU: 4.5 PFLOP/s sparse).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bB200\b", 2250.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b.*\bPCIE\b", 756.0),
    (r"\bH100\b", 989.0),  # SXM5 (reported as e.g. "NVIDIA H100 80GB HBM3")
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bG?H200\b", 989.0),  # H200 SXM and GH200
    (r"\bH800\b", 989.0),
    (r"\bH20\b", 148.0),
    (r"\bA100\b", 312.0),  # SXM4 and PCIe alike
    (r"\bA800\b", 312.0),
    (r"\bA10G\b", 70.0),
    (r"\bA10\b", 125.0),
    (r"\bA30\b", 165.0),
    (r"\bA40\b", 149.7),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 6000 ADA\b", 364.2),
    (r"\bRTX A6000\b", 154.8),
    (r"\bRTX 4090\b", 165.2),
    (r"\bRTX 3090\b", 71.0),
    (r"\bV100S\b", 130.0),
    (r"\bV100\b.*\bPCIE\b", 112.0),
    (r"\bV100\b", 125.0),  # SXM2
    (r"\bT4\b", 65.0),
)


def linear_flops(n_tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * n_tokens * d_in * d_out


def attention_flops(n_queries: float, n_keys: float, width: int) -> float:
    """Scores Q K^T and the weighted sum P V over all heads (the head count cancels)."""
    return 4.0 * n_queries * n_keys * width


def swiglu_flops(n_tokens: float, d_model: int, hidden: int) -> float:
    return 2 * linear_flops(n_tokens, d_model, hidden) + linear_flops(n_tokens, hidden, d_model)


def self_attention_block_flops(n_tokens: int, d_model: int, hidden: int) -> float:
    qkv = linear_flops(n_tokens, d_model, 3 * d_model)
    out = linear_flops(n_tokens, d_model, d_model)
    return qkv + attention_flops(n_tokens, n_tokens, d_model) + out + swiglu_flops(n_tokens, d_model, hidden)


def mcab_flops(n_queries: int, n_keys: int, d_model: int, hidden: int, batch_size: int) -> float:
    """One MCAB per cell; its queries are shared by the batch, so their projection is amortised."""
    q = linear_flops(n_queries, d_model, d_model) / batch_size
    kv = linear_flops(n_keys, d_model, 2 * d_model)
    out = linear_flops(n_queries, d_model, d_model)
    attn = attention_flops(n_queries, n_keys, d_model)
    return q + kv + attn + out + swiglu_flops(n_queries, d_model, hidden)


def vae_forward_flops(cfg: VAEConfig, n_genes: int, tokens_per_cell: int, batch_size: int) -> float:
    """Forward FLOPs per cell of SetVAE: encode S gene tokens, decode G genes, the likelihood head."""
    e, m, latent = cfg.d_model, cfg.n_latent_tokens, cfg.latent_dim
    hidden = swiglu_hidden_dim(e, cfg.mlp_ratio)
    flops = linear_flops(tokens_per_cell, e + 1, e) if cfg.input_embedding == "concat" else 0.0
    flops += mcab_flops(m, tokens_per_cell, e, hidden, batch_size)
    flops += 2 * cfg.n_layers * self_attention_block_flops(m, e, hidden)
    n_out = 2 * latent if cfg.latent_mode == "gaussian" else latent
    flops += linear_flops(m, e, n_out) + linear_flops(m, latent, e)
    flops += mcab_flops(n_genes, m, e, hidden, batch_size)
    n_head_outputs = 2 if cfg.likelihood == "nb" and cfg.theta_mode == "cell" else 1
    return flops + n_head_outputs * linear_flops(n_genes, e, 1)


def dit_forward_flops(cfg: PriorConfig, n_tokens: int, token_dim: int) -> float:
    """Forward FLOPs per cell of the DiT on M latent tokens of width L."""
    d, m = cfg.d_model, n_tokens
    mlp_hidden = int(d * cfg.mlp_ratio)  # as DiTBlock
    flops = linear_flops(1, TIME_FREQUENCIES, d) + linear_flops(1, d, d)  # timestep MLP
    flops += linear_flops(m, token_dim, d)
    block = (
        linear_flops(1, d, 6 * d)  # adaLN modulation, once per cell
        + linear_flops(m, d, 3 * d)
        + attention_flops(m, m, d)
        + linear_flops(m, d, d)
        + linear_flops(m, d, mlp_hidden)
        + linear_flops(m, mlp_hidden, d)
    )
    flops += cfg.n_layers * block
    return flops + linear_flops(1, d, 2 * d) + linear_flops(m, d, token_dim)


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


def lookup_peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU by its CUDA name, None when it is not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


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
