"""`scldm-scale plan`: what a config's model costs before any GPU is rented.

For the model of the config's stage (stage=vae: the SetVAE; stage=ldm: the DiT prior) it reports the
parameter count (the model is built on the meta device, so a 1B model costs no memory), the training
FLOPs per cell and an estimate of the memory each rank holds under every strategy. The model reports its
own transformer blocks, forward FLOPs and saved activations (models/cost.py); plan only sums them.

Memory per parameter follows the ZeRO paper's accounting of mixed-precision AdamW (Rajbhandari et al.
2020, section 3.1): under train.precision=bf16 (and auto, which is bf16 on the GPUs plan is for) the
params and grads are bf16 compute copies (2 + 2 bytes) and the optimizer holds an fp32 master copy and
two fp32 moments (12 bytes); under fp32 the params are the master (4 + 4 + 8 bytes). FSDP2 keeps its
fp32 master as the sharded parameter itself (4 + 4 + 8 instead of 2 + 2 + 12): the same total.

What is divided by the world size N:
  single, ddp   nothing: every rank holds everything (single is one rank)
  zero1         optimizer states                     (DeepSpeed ZeRO stage 1)
  zero2         optimizer states and grads           (stage 2)
  zero3         optimizer states, grads and params   (stage 3)
  fsdp          optimizer states, grads and params   (FSDP2, one unit per transformer block)
Sharded params are all-gathered one unit at a time; "other" holds one gathered unit (its params and
grads, unsharded), or every parameter when FSDP's train.reshard_after_forward=false keeps them gathered
from the forward to the backward. stage=ldm keeps an EMA of the prior ("ema": fp32, partitioned like the
params, so divided by N under fsdp and zero3, whole on every rank otherwise) and adds the frozen VAE (fp32,
replicated) to "other". With train.offload_optimizer, DeepSpeed keeps the optimizer states in CPU memory:
they leave the GPU column.

Activations (per rank, train.batch_size cells per micro-batch) are the tensors autograd saves for the
backward pass, as the model's `activation_profile` counts them block by block (each block's `activations`
in mcab.py and dit.py), plus what lives outside the blocks and the loss's fp32 temporaries (the eager NB
log-likelihood keeps about 12 (B, G) tensors). With activation checkpointing (per block) only each block's
input is kept, plus one block's full activations while it is recomputed in the backward, so the largest
block sets the floor. The VAE decodes its genes in chunks (model.decode_chunk_genes) and recomputes each
chunk in the backward pass by itself, so its decoder keeps O(G) scalars per cell plus one chunk's (chunk x E)
working set, with or without activation checkpointing; -1 (no chunks) keeps the whole (G x E) unpooling.
These are estimates (allocator fragmentation, communication buffers, the CUDA context and workspace come
on top; budget 10-20% more), meant to choose a strategy, not to predict bytes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from scldm_scale.config import Config, ConfigError, add_config_arguments, load_config, split_config_args
from scldm_scale.models.dit import DiT
from scldm_scale.models.prior import FlowMatchingPrior
from scldm_scale.models.vae import SetVAE
from scldm_scale.outputs import add_overwrite, claim_output
from scldm_scale.train.flops import TRAIN_FLOPS_FACTOR

# The vocabulary comes from the data; without data, plan assumes a typical highly-variable-gene panel.
DEFAULT_N_GENES = 2000
# Expressed genes per cell (data.gene_tokens=expressed): about a tenth of the panel in typical scRNA-seq.
DEFAULT_EXPRESSED_FRACTION = 0.1
# The DiT's class tables (one per data.condition_keys entry) need a class count; their size is negligible.
CLASSES_PER_CONDITION_KEY = 100

STRATEGY_CHOICES = ("single", "ddp", "fsdp", "deepspeed", "all")
STRATEGIES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")
# What each strategy divides by the world size: (params, grads, optimizer states).
SHARDED = {
    "single": (False, False, False),
    "ddp": (False, False, False),
    "fsdp": (True, True, True),
    "zero1": (False, False, True),
    "zero2": (False, True, True),
    "zero3": (True, True, True),
}
GIB = 2**30
BYTE_FIELDS = ("params", "grads", "optimizer", "ema", "other", "activations", "activations_ckpt", "optimizer_cpu")


@dataclass
class MemoryRow:
    """Bytes per rank under one strategy."""

    strategy: str
    world_size: int
    params: float
    grads: float
    optimizer: float
    other: float
    activations: float
    activations_ckpt: float
    optimizer_cpu: float = 0.0
    ema: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema + self.other + self.activations

    @property
    def total_ckpt(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema + self.other + self.activations_ckpt


def load_plan_config(paths: Sequence[str | Path], overrides: Sequence[str]) -> Config:
    """load_config, except that stage=ldm needs no VAE checkpoint: plan reads M and L from model.*."""
    return load_config(list(paths), ["train.vae_checkpoint=unused-by-plan", *overrides])


def default_tokens_per_cell(cfg: Config, n_genes: int) -> int:
    if cfg.data.gene_tokens == "dense":
        return n_genes
    tokens = max(1, round(DEFAULT_EXPRESSED_FRACTION * n_genes))
    if cfg.data.gene_tokens == "expressed_plus_zeros":
        tokens += cfg.data.n_zero_tokens
    return min(tokens, n_genes)


def build_vae(cfg: Config, n_genes: int) -> SetVAE:
    with torch.device("meta"):
        return SetVAE(cfg.model, n_genes)


def build_dit(cfg: Config) -> DiT:
    n_classes = {key: CLASSES_PER_CONDITION_KEY for key in cfg.data.condition_keys}
    with torch.device("meta"):
        return DiT(cfg.prior, cfg.model.n_latent_tokens, cfg.model.latent_dim, n_classes)


def build_prior(cfg: Config) -> FlowMatchingPrior:
    """The DiT (on the meta device) with its flow-matching objective, as stage=ldm trains it."""
    return FlowMatchingPrior(build_dit(cfg), cfg.prior.cond_drop_prob, cfg.prior.cond_dropout)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def largest_unit_parameters(model: nn.Module) -> int:
    """Parameters of the largest all-gathered unit: a block, or the root (everything outside blocks)."""
    blocks = [count_parameters(block) for block in model.transformer_blocks()]
    return max([count_parameters(model) - sum(blocks), *blocks])


def bytes_per_parameter(precision: str) -> tuple[int, int, int]:
    """(params, grads, optimizer states) bytes per parameter, ZeRO accounting."""
    return (4, 4, 8) if precision == "fp32" else (2, 2, 12)


def expand_strategies(strategy: str) -> tuple[str, ...]:
    if strategy == "all":
        return STRATEGIES
    if strategy == "deepspeed":
        return ("zero1", "zero2", "zero3")
    if strategy not in STRATEGY_CHOICES:
        raise ConfigError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGY_CHOICES)}")
    return (strategy,)


def configured_strategy(cfg: Config) -> str:
    return f"zero{cfg.train.zero_stage}" if cfg.train.strategy == "deepspeed" else cfg.train.strategy


def memory_row(
    cfg: Config,
    strategy: str,
    world_size: int,
    n_params: int,
    largest_unit: int,
    activation_bytes: tuple[float, float],
    frozen_params: int = 0,
) -> MemoryRow:
    n = 1 if strategy == "single" else world_size
    param_b, grad_b, optim_b = bytes_per_parameter(cfg.train.precision)
    shard_params, shard_grads, shard_optim = SHARDED[strategy]
    params = n_params * param_b / (n if shard_params else 1)
    grads = n_params * grad_b / (n if shard_grads else 1)
    optimizer = n_params * optim_b / (n if shard_optim else 1)
    other = 0.0
    if shard_params:
        keeps_all_gathered = strategy == "fsdp" and not cfg.train.reshard_after_forward
        other += (n_params if keeps_all_gathered else largest_unit) * param_b + largest_unit * grad_b
    ema = 4 * n_params / (n if shard_params else 1) if cfg.stage == "ldm" else 0.0
    other += 4 * frozen_params  # the frozen VAE of stage=ldm
    optimizer_cpu = 0.0
    if strategy.startswith("zero") and cfg.train.offload_optimizer:
        optimizer, optimizer_cpu = 0.0, optimizer
    return MemoryRow(
        strategy, n, params, grads, optimizer, other, *activation_bytes, optimizer_cpu=optimizer_cpu, ema=ema
    )


def make_plan(
    cfg: Config,
    world_size: int = 8,
    strategy: str = "all",
    n_genes: int | None = None,
    tokens_per_cell: int | None = None,
) -> dict:
    """Parameters, FLOPs per cell and memory rows for the config's stage; see the module docstring."""
    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    n_genes = DEFAULT_N_GENES if n_genes is None else n_genes
    if n_genes < 1:
        raise ConfigError(f"--n-genes must be >= 1, got {n_genes}")
    tokens = default_tokens_per_cell(cfg, n_genes) if tokens_per_cell is None else tokens_per_cell
    if not 1 <= tokens <= n_genes:
        raise ConfigError(f"--tokens-per-cell must be in [1, n_genes={n_genes}], got {tokens}")
    vae = build_vae(cfg, n_genes)
    if cfg.stage == "vae":
        model, frozen_params = vae, 0
        # A training step decodes model.decode_genes of the vocabulary's genes (all by default).
        decoded = min(cfg.model.decode_gene_count or n_genes, n_genes)
        forward = vae.forward_flops(tokens, decoded, cfg.train.batch_size)
        profile = vae.activation_profile(tokens, decoded, cfg.train.batch_size)
    else:
        prior = build_prior(cfg)
        model, frozen_params = prior.dit, count_parameters(vae)
        forward = prior.forward_flops()
        profile = prior.activation_profile()
    compute_bytes = 4 if cfg.train.precision == "fp32" else 2
    batch = cfg.train.batch_size
    activation_bytes = (
        batch * profile.bytes_per_cell(compute_bytes, checkpointing=False),
        batch * profile.bytes_per_cell(compute_bytes, checkpointing=True),
    )
    n_params, largest_unit = count_parameters(model), largest_unit_parameters(model)
    rows = [
        memory_row(cfg, s, world_size, n_params, largest_unit, activation_bytes, frozen_params)
        for s in expand_strategies(strategy)
    ]
    return {
        "stage": cfg.stage,
        "model": type(model).__name__,
        "parameters": n_params,
        "largest_unit_parameters": largest_unit,
        "frozen_vae_parameters": frozen_params,
        "n_genes": n_genes,
        "decoded_genes_per_step": decoded if cfg.stage == "vae" else None,
        "tokens_per_cell": tokens,
        "decode_chunk_genes": vae.decode_chunk(batch, n_genes) if cfg.stage == "vae" else None,
        "latent_shape": [cfg.model.n_latent_tokens, cfg.model.latent_dim],
        "flops_per_cell_forward": forward,
        "flops_per_cell_train": TRAIN_FLOPS_FACTOR * forward,
        "batch_size": batch,
        "activation_mib_per_cell": [b / batch / 2**20 for b in activation_bytes],
        "precision": cfg.train.precision,
        "world_size": world_size,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "configured_strategy": configured_strategy(cfg),
        "memory_gib": [
            {
                **{k: v / GIB if k in BYTE_FIELDS else v for k, v in asdict(row).items()},
                "total": row.total / GIB,
                "total_ckpt": row.total_ckpt / GIB,
            }
            for row in rows
        ],
    }


def _amount(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value >= 1 or value == 0 else f"{value:.2g}"


def format_plan(plan: dict) -> str:
    precision = "fp32" if plan["precision"] == "fp32" else "bf16"
    per_param = "4 + 4 + 8" if precision == "fp32" else "2 + 2 + 12 (fp32 master + 2 moments)"
    if plan["stage"] == "vae":
        shape = (
            f"n_genes={plan['n_genes']:,}, tokens per cell={plan['tokens_per_cell']:,}, "
            f"decoded {plan['decode_chunk_genes']:,} genes at a time"
        )
    else:
        m, latent = plan["latent_shape"]
        shape = f"on {m} latent tokens of width {latent}; frozen VAE: {plan['frozen_vae_parameters']:,} parameters"
    act, act_ckpt = plan["activation_mib_per_cell"]
    lines = [
        f"stage={plan['stage']}: {plan['model']} with {plan['parameters']:,} parameters ({shape})",
        f"FLOPs per cell: forward {plan['flops_per_cell_forward']:.3g}, train {plan['flops_per_cell_train']:.3g} "
        f"(3x forward); per rank and step (batch {plan['batch_size']}): "
        f"{plan['flops_per_cell_train'] * plan['batch_size']:.3g}",
        f"activations per cell: {_amount(act)} MiB, {_amount(act_ckpt)} MiB with activation checkpointing (AC)",
        f"precision {precision}: params + grads + optimizer = {per_param} bytes per parameter; "
        f"world size {plan['world_size']}",
        "",
    ]
    header = (
        f"{'strategy':<10} {'ranks':>5} {'params':>8} {'grads':>8} {'optim':>8} {'ema':>8} {'other':>8} "
        f"{'activ':>8} {'activ+AC':>8} {'total':>8} {'total+AC':>8}"
    )
    lines += ["GiB per rank", header, "-" * len(header)]
    for row in plan["memory_gib"]:
        mark = "*" if row["strategy"] == plan["configured_strategy"] else ""
        values = [row[k] for k in ("params", "grads", "optimizer", "ema", "other", "activations", "activations_ckpt")]
        values += [row["total"], row["total_ckpt"]]
        lines.append(
            f"{row['strategy'] + mark:<10} {row['world_size']:>5} " + " ".join(f"{_amount(v):>8}" for v in values)
        )
        if row["optimizer_cpu"]:
            lines.append(f"{'':<10} optimizer states in CPU memory: {_amount(row['optimizer_cpu'])} GiB per rank")
    ac = "on" if plan["activation_checkpointing"] else "off"
    lines.append(f"other: gathered FSDP/ZeRO-3 unit{', frozen VAE' if plan['stage'] == 'ldm' else ''}")
    lines.append(f"*: the config's train.strategy (train.activation_checkpointing is {ac})")
    return "\n".join(lines)


def run_plan(
    paths: Sequence[str | Path],
    overrides: Sequence[str],
    world_size: int = 8,
    strategy: str = "all",
    n_genes: int | None = None,
    tokens_per_cell: int | None = None,
    json_path: str | None = None,
) -> dict:
    """Load the config(s), print the plan table, optionally write it as JSON."""
    cfg = load_plan_config(paths, overrides)
    plan = make_plan(cfg, world_size, strategy, n_genes, tokens_per_cell)
    print(format_plan(plan))
    if json_path:
        Path(json_path).resolve().parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(plan, indent=2) + "\n")
        print(f"wrote {json_path}")
    return plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale plan`."""
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=int, default=8, help="ranks the sharded strategies divide by")
    parser.add_argument("--strategy", default="all", choices=STRATEGY_CHOICES, help="the strategies to plan")
    genes_help = "genes in the vocabulary (default: the data's, else 2000)"
    parser.add_argument("--n-genes", type=int, default=None, help=genes_help)
    tokens_help = "encoder tokens per cell (default: 10%% of the genes)"
    parser.add_argument("--tokens-per-cell", type=int, default=None, help=tokens_help)
    json_help = "also write the plan to this JSON file (default: only print it)"
    parser.add_argument("--json", default=None, metavar="OUT", help=json_help)
    add_overwrite(parser, "the file at --json")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    if args.json:
        claim_output(args.json, "the plan", "--json", args.overwrite, folder=False)
    paths, overrides = split_config_args(args.configs)
    run_plan(paths, overrides, args.world_size, args.strategy, args.n_genes, args.tokens_per_cell, args.json)
