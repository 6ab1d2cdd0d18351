"""Typed, closed configuration schemas: load YAML -> merge dot-list overrides -> validate; and the CLI's
flags as views of them.

Every section is a dataclass; OmegaConf's structured configs reject unknown keys and wrong types, and
`load_config` turns those errors into one line that names the key and says how to fix it. Choices
(enums spelled as strings) sit in each field's metadata (`option`) and are checked in `validate`, which
also checks cross-field constraints.

`Config` is a training run (`scldm-scale train`, `plan`, `profile-step`, the quickstart); its `sample`
section is how cells are generated. The other commands' options have sections of their own, outside a
run's YAML: `EvalConfig` (with `HoldoutConfig`), `EmbedConfig`, `PrepareConfig`, `KernelShapeConfig`.

A command declares a flag with `add_option(parser, Section, "field")`: the flag's default, type, choices
and help are the field's, so flags, YAML keys and the Python API share one definition (the sampler's
defaults, for one, live in `SampleConfig` and nowhere else). `parse_pairs`, `parse_ints` and
`split_config_args` turn command-line text into config values, raising ConfigError.
"""

from __future__ import annotations

import argparse
import math
import types
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def option(default: Any, help: str = "", choices: Sequence[str] = ()) -> Any:
    """A schema field that documents itself: `help` is its CLI flag's help text, `choices` the values
    `validate` (and the flag) accept. A list default is copied for each instance."""
    metadata = {"help": help, "choices": tuple(choices)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    # "soma": a SOMA experiment at `uri` (made by `scldm-scale prepare`); "census": the CELLxGENE Census
    # (`census_version`, or a local Census-shaped collection at `uri`); "h5ad": in memory, for small data.
    source: str = option("soma", choices=("soma", "census", "h5ad"))
    uri: str | None = None
    census_version: str = "stable"
    organism: str = "homo_sapiens"
    # SOMA value filters, e.g. "is_primary_data == True and tissue_general == 'lung'".
    obs_filter: str | None = None
    var_filter: str | None = None
    # Scatter-gather shuffling: contiguous chunks of cells, a buffer of several chunks shuffled together.
    chunk_size: int = 64
    buffer_chunks: int = 1024
    num_workers: int = 0
    # SOMA/Census: buffers each loader process (worker, or the main process) reads per group, as that many
    # TileDB reads of one narrower range each: ~k-fold less CPU per cell when a group holds a large share of
    # the experiment (up to a few hundred thousand cells), for k buffers' CSR rows (plus k being read) held.
    group_buffers: int = 1
    # Encoder tokens per cell: "expressed" genes only, "dense" (all genes), or "expressed_plus_zeros"
    # (the expressed genes plus n_zero_tokens genes sampled among the cell's zeros).
    gene_tokens: str = option("expressed", choices=("expressed", "dense", "expressed_plus_zeros"))
    n_zero_tokens: int = 0
    # h5ad source: path to an .h5ad with raw integer counts; null uses the built-in dataset `builtin`.
    path: str | None = None
    builtin: str = "pbmc68k_reduced"
    # Layer holding the counts; null means X (h5ad), "counts" (soma) or "raw" (census).
    layer: str | None = None
    # obs columns that become the model's conditions (label-encoded; stored in the model artifact).
    condition_keys: list[str] = field(default_factory=lambda: ["bulk_labels"])
    # obs column with "train"/"test"; created (stratified by the first condition key) when absent.
    split_key: str = "split"
    test_fraction: float = 0.2
    split_seed: int = 0
    # Only for data that is not raw counts (e.g. ambient-corrected): allow non-integer values.
    allow_non_integer: bool = False
    # The VAE's vocabulary: "all" genes (foundation training), "hvg:N" (the N most variable by scanpy's
    # seurat_v3 on the raw counts of up to 20,000 train cells) or the path of a file of gene ids, one a line.
    genes: str = "all"
    # Data on a trained model's genes (stage=ldm on another dataset) that lacks some of them: encode its cells
    # without them (absent tokens; the model still decodes every gene) instead of refusing it.
    allow_missing_genes: bool = False
    # Condition combinations kept out of training (both stages, every source), to evaluate generation for
    # combinations the model never saw, e.g. [{cell_line: line_B, perturbation: pert_2}]. A cell matching
    # any entry (all of its key: value pairs) is held out; keys are data.condition_keys, and each held-out
    # value must still occur in other training cells, so the model knows it.
    holdout_combinations: list[dict[str, str]] = field(default_factory=list)


@dataclass
class VAEConfig:
    d_model: int = 64
    n_heads: int = 4
    n_cross_heads: int = 4
    n_layers: int = 2
    n_latent_tokens: int = 16
    latent_dim: int = 16
    # "layernorm": deterministic latent, LayerNorm without affine (the reference, KL 0);
    # "gaussian": diagonal Gaussian per token with a KL to N(0, I) weighted by kl_weight.
    latent_mode: str = option("layernorm", choices=("layernorm", "gaussian"))
    kl_weight: float = 1e-4
    # "scale": E[gene] * log1p(count) (the reference); "concat": Linear([E[gene], log1p(count)]).
    input_embedding: str = option("scale", choices=("scale", "concat"))
    # Encoder pooling: "uniform" (each expressed gene's token weighs by its attention score alone; the pooling's
    # key LayerNorm removes the count of a "scale" token), "count" or "log1p" (each token's attention weight
    # times its count or log1p(count): with flat scores the pooled vector is the count-weighted mean of the
    # genes' values, a linear map of the cell's library-normalised profile).
    pooling_weights: str = option("uniform", choices=("uniform", "log1p", "count"))
    share_gene_embedding: bool = True
    # Add a linear path from the latent to every gene's NB logit (or Gaussian mean): logit[c, g] += U[g] .
    # W vec(z_c), per-gene loadings U (genes x d_model) from zero. The unpooling's attention starts flat, so a
    # cell's latent first shifts every gene alike (the softmax over genes cancels that); this path is
    # gene-specific from the first step (quickstart --data turns it on for whole-transcriptome data).
    latent_gene_path: bool = False
    # The first N training forward passes decode a detached latent: the encoder (a random map of the counts
    # at init, which already separates cell types with count pooling) is frozen while the decoder learns to
    # read it; a decoder that ignores the latent otherwise drives every cell's latent to the same point.
    encoder_warmup_steps: int = 0
    # Each training forward pass hides every expressed gene's token from the encoder with this probability (a
    # cell keeps at least one); the decoder still reconstructs every gene: a denoising, masked-input VAE.
    # Evaluation, encoding for the prior and inference see every token.
    encoder_token_dropout: float = 0.0
    # "nb": negative binomial on raw counts; "gaussian": Gaussian on log1p(counts / L * 1e4).
    likelihood: str = option("nb", choices=("nb", "gaussian"))
    # "gene": one learned inverse dispersion per gene; "cell": predicted per cell and gene.
    theta_mode: str = option("gene", choices=("gene", "cell"))
    mlp_ratio: float = 8 / 3
    # MCAB cross-attention (pooling, unpooling): "torch" (SDPA) or "triton" (the fused kernels of kernels/).
    attention_backend: str = option("torch", choices=("torch", "triton"))
    # With attention_backend=triton: fold the pooling's key/value projections into its shared queries (the
    # keys and values of the gene tokens are never formed). Fewer FLOPs when n_cross_heads * n_latent_tokens
    # < d_model + n_latent_tokens; see kernels/README.md.
    fold_pooling: bool = False
    # NB negative log-likelihood over cells x genes: "torch" (eager) or "triton" (the fused kernel).
    nb_loss_backend: str = option("torch", choices=("torch", "triton"))
    # Genes a VAE training step decodes: "all", or N (gene-subset training: the batch's expressed genes, up to
    # N/2, plus unexpressed genes drawn uniformly, N in all, scored with the softmax and library size over
    # them). Encoding latents, generation and evaluation always decode every gene.
    decode_genes: str = "all"
    # Genes the decoder unpools at a time, each chunk recomputed in the backward pass, so that only the per-gene
    # logits are kept for all genes (models/vae.py). 0: automatic (the largest chunk whose cells x genes x
    # width activations fit a fixed budget, SetVAE.decode_chunk); N > 0: N genes; -1: all genes in one pass.
    decode_chunk_genes: int = 0

    @property
    def decode_gene_count(self) -> int | None:
        """model.decode_genes as a number of genes; None for every gene."""
        return None if self.decode_genes == "all" else int(self.decode_genes)


@dataclass
class PriorConfig:
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    mlp_ratio: float = 4.0
    # Probability that a condition is replaced by its NULL token during training.
    cond_drop_prob: float = 0.2
    # "independent": each key dropped on its own; "one_at_a_time": one random key is active per
    # cell (the rest NULL), the compositional scheme; "joint": all keys dropped together.
    cond_dropout: str = option("independent", choices=("independent", "one_at_a_time", "joint"))


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    # "wsd": linear warmup, constant, sqrt decay to min_lr_ratio; "cosine": warmup then cosine.
    schedule: str = option("wsd", choices=("wsd", "cosine"))
    warmup_frac: float = 0.1
    decay_frac: float = 0.1
    min_lr_ratio: float = 0.1
    max_steps: int = 1000


@dataclass
class StageOptimConfig:
    vae: OptimConfig = field(default_factory=OptimConfig)
    ldm: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, schedule="cosine"))


@dataclass
class TrainConfig:
    # Overrides optim.<stage>.max_steps when set.
    max_steps: int | None = None
    batch_size: int = 128
    grad_clip: float = 10.0
    # EMA of the prior's weights, used for sampling. Update n decays by min(ema_decay, (1 + n) / (10 + n)), so
    # a decay d binds only after (10 d - 1) / (1 - d) updates: 0.999 after 8,990, 0.995 after 1,790 (the
    # quickstart's 1,500-step prior runs on the warm-up alone, whatever the value above 0.994).
    ema_decay: float = 0.999
    # stage=ldm: each epoch draws the training latents with probability n^-x, n the training cells that share
    # the cell's combination of condition values: 0 a plain shuffle, 1 every combination equally often. The
    # VAE (unconditional) ignores it; a prior without conditions draws every cell alike.
    balance_conditions: float = 0.0
    # "auto": bf16 autocast on CUDA devices that support it, fp32 elsewhere.
    precision: str = option("auto", choices=("auto", "bf16", "fp32"))
    device: str = "auto"
    num_threads: int | None = None
    # glibc's treatment of the CPU decoder's freed blocks (host_memory.py): "auto" keeps them for a one-pass
    # decoder and releases them for a chunked one (lower peak RSS, a page fault per touched page each step);
    # "keep" or "release" forces one for the whole process.
    host_memory: str = option("auto", choices=("auto", "keep", "release"))
    log_every: int = 50
    ckpt_dir: str = "runs/default"
    # Training checkpoints every N steps under ckpt_dir/<stage>/step-N (0: none until the end).
    ckpt_every: int = 0
    keep_last: int = 3
    # "never", "auto" (the latest complete checkpoint of this stage, if any), or a step-N folder.
    resume: str = "never"
    # The VAE model artifact (<ckpt_dir>/vae-model of stage=vae) the ldm stage encodes cells with.
    vae_checkpoint: str | None = None
    # stage=vae: start from this vae or ldm model artifact's weights (fine-tuning), on data that may have
    # another gene set: the genes both vocabularies hold keep their trained rows, new genes start fresh.
    init_from: str | None = None
    # stage=vae, NB likelihood: the per-gene logit offset starts at the log of each gene's share of the training
    # cells' counts ("data") or at 0 ("zero"); "auto": "data" when a step decodes a subset of the genes
    # (model.decode_genes), where each gene's offset is updated only in the few steps that decode it.
    init_gene_bias: str = option("auto", choices=("auto", "data", "zero"))
    metrics_file: str | None = None
    progress: bool = True
    # How the model is spread over processes: single | ddp | fsdp (FSDP2) | deepspeed (ZeRO).
    strategy: str = option("single", choices=("single", "ddp", "fsdp", "deepspeed"))
    # DeepSpeed ZeRO stage (1: optimizer states, 2: + gradients, 3: + parameters sharded).
    zero_stage: int = 2
    # DeepSpeed: keep optimizer states in CPU memory.
    offload_optimizer: bool = False
    # FSDP2: free the gathered parameters of a block after its forward (less memory, one more all-gather).
    reshard_after_forward: bool = True
    # Gradient reduction dtype under bf16 (fp32 is exact-er, bf16 halves the traffic).
    reduce_dtype: str = option("fp32", choices=("fp32", "bf16"))
    # Recompute each transformer block's activations in the backward pass.
    activation_checkpointing: bool = False
    # Micro-batches of train.batch_size per optimizer step (the global batch is batch_size x accum x ranks).
    grad_accum_steps: int = 1
    # torch.compile each transformer block.
    compile: bool = False
    # FSDP: build the model on the meta device and initialise each rank's shards in place, so no rank ever
    # holds the full weights (models larger than one device). Same init rules, other random draws than
    # a single-process run with the same seed.
    init_on_meta: bool = False
    # Peak dense bf16 TFLOP/s of one device, for MFU; None looks the device up in a table of known GPUs.
    peak_tflops: float | None = None


SAMPLERS = ("euler", "heun", "dopri5", "sde")


@dataclass
class SampleConfig:
    """How cells are generated: the ODE solver from noise to latents, and guidance (`models/sampling.py`)."""

    method: str = option(
        "heun",
        "ODE solver (dopri5: adaptive), or sde: Euler-Maruyama on an SDE with the ODE's marginals (sample.sde_noise)",
        choices=SAMPLERS,
    )
    n_steps: int = option(50, "solver steps of euler, heun and sde (heun costs 2 model calls per step)")
    sde_noise: float = option(
        1.0,
        "noise level e of method=sde: drift v - e (x - t v), diffusion sqrt(2 e (1 - t)); 0 is the euler ODE",
    )
    atol: float = option(1e-5, "absolute tolerance of dopri5")
    rtol: float = option(1e-5, "relative tolerance of dopri5")
    batch_size: int = option(1024, "cells per ODE solve")
    guidance: float = option(1.0, "guidance weight of a condition given no weight of its own (1: plain conditioning)")
    guidance_mode: str = option(
        "auto",
        "compositional: v_null + sum_k w_k (v_k - v_null), one branch per condition key; joint: v_null + w (v_all - "
        "v_null), all keys in one branch (w: the largest weight); auto: joint for a prior trained with "
        "prior.cond_dropout=joint, else compositional",
        choices=("auto", "compositional", "joint"),
    )
    library_size: str = option(
        "auto",
        "each generated cell's library size: latent (log-normal around a linear fit on the cell's latent, made when "
        "the prior was trained: depth and profile agree), condition (log-normal per condition value, independent of "
        "the latent), auto: latent for a model that has the fit, else condition (models written before it)",
        choices=("auto", "latent", "condition"),
    )
    guidance_interval: list[float] = option(
        [0.0, 1.0],
        "the ODE times LO,HI (t: 0 = noise, 1 = data) where the guidance weights apply; outside them every weight "
        "is 1 (with one condition key: plain conditioning, one model call); 0,1 guides the whole path",
    )


def check_guidance_interval(interval: Sequence[float], where: str) -> tuple[float, float]:
    """(lo, hi) of a guidance interval, checked: two numbers with 0 <= lo < hi <= 1; else a ConfigError
    naming `where`."""
    values = list(interval)
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where} takes two times LO,HI between 0 (noise) and 1 (data), e.g. 0,0.5; got {values}")
    lo, hi = float(values[0]), float(values[1])
    if not 0.0 <= lo < hi <= 1.0:
        raise ConfigError(f"{where} must satisfy 0 <= LO < HI <= 1 (t: 0 = noise, 1 = data); got {lo},{hi}")
    return lo, hi


def check_sde_noise(value: float, where: str) -> float:
    """The SDE sampler's noise level, checked: a finite number >= 0; else a ConfigError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} must be a finite number >= 0 (0: no noise, the euler ODE); got {value!r}")
    return float(value)


BASELINES = ("real_train_cells", "independent_nb", "scvi", "additive_shift")


@dataclass
class HoldoutConfig:
    """Condition combinations held out of training, and the columns the additive-shift baseline reads."""

    combinations: list[dict[str, str]] = option(
        [], "a combination held out of training, e.g. cell_line=A,perturbation=P (repeatable; default: none)"
    )
    perturbation_key: str = option("perturbation", "obs column of the perturbations (additive-shift baseline)")
    context_key: str = option("cell_line", "obs column of the contexts the perturbations act in")
    control_value: str = option("control", "the perturbation value of unperturbed cells")


@dataclass
class EvalConfig:
    """`scldm-scale evaluate`: what generated cells are compared on, and against which baselines."""

    condition_keys: list[str] = option([], "obs column of conditions (repeatable; default: none, all cells as one)")
    baselines: list[str] = option(
        [b for b in BASELINES if b != "scvi"],
        "comma-separated baselines to compute, or '' for none (scvi needs pip install 'scldm-scale[scvi]')",
    )
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)
    intersect_genes: bool = option(False, "evaluate on the shared genes only")
    n_pcs: int = option(30, "principal components of the log-normalised counts")
    n_hvg: int = option(2000, "highly variable genes the PCA is fitted on")
    seed: int = option(0, "random seed of the baselines and the subsampling")
    scvi_epochs: int = option(200, "training epochs of the scvi baseline")
    vae_checkpoint: str | None = option(
        None,
        "a vae or ldm model artifact folder: adds its reconstruction of the real cells and the "
        "reconstruction_ceiling row, the real cells encoded, decoded and sampled, and with training cells and the "
        "real_train_cells baseline the train_reconstruction row, the noise floor's cells the same way (default: none)",
    )
    plots: bool = option(True, "draw the figures")
    de: bool = option(True, "score differential-expression recovery (one-vs-rest t-test per condition value)")


@dataclass
class EmbedConfig:
    """How `scldm-scale embed` and `classify` read cells and run the encoder."""

    batch_size: int = option(256, "cells per encoder batch")
    device: str = option("cpu", "torch device of the encoder")
    layer: str | None = option(None, "layer of an .h5ad input with raw counts, or raw.X (default: X)")
    allow_missing_genes: bool = option(
        False, "encode when the input lacks some of the model's genes (they become absent tokens)"
    )


@dataclass
class PrepareConfig:
    """`scldm-scale prepare`: how an input file becomes a SOMA experiment."""

    layer: str | None = option(
        None, "layer with raw counts, or raw.X (default: detected among X, a counts layer and raw.X)"
    )
    labels: list[str] = option([], "comma-separated obs columns to keep, e.g. cell_type,tissue (default: none)")
    test_fraction: float = option(0.1, "fraction of the cells in the test split (stratified by the first label)")
    val_fraction: float = option(0.05, "fraction of the cells in the validation split")
    seed: int = option(0, "seed of the split")
    zero_cells: str = option("drop", "cells with zero counts", choices=("drop", "refuse"))
    allow_non_integer: bool = option(False, "accept non-integer values (not raw counts)")
    overwrite: bool = option(False, "replace an existing experiment at --out")
    append: bool = option(False, "add these cells to the experiment at --out")
    genes: str = option("all", "genes to keep: all, hvg:N (seurat_v3 on raw counts) or a file of gene ids")
    gene_id_column: str | None = option(None, "var column of gene ids, or index (default: the most Ensembl-like)")
    gene_name_column: str | None = option(None, "var column of gene symbols, or index (default: detected)")


@dataclass
class KernelShapeConfig:
    """The problem `bench kernels` and `profile-kernels` run the Triton kernels on."""

    cells: int = option(256, "cells per batch")
    heads: int = option(8, "attention heads")
    n_latents: int = option(32, "latent tokens M")
    head_dim: int = option(64, "dimension of one head")
    dtype: str = option("bf16", "dtype of the inputs", choices=("bf16", "fp16", "fp32"))
    smoke: bool = option(
        False, "tiny shapes on the CPU under the Triton interpreter (automatic without CUDA): no timing meaning"
    )


@dataclass
class WandbConfig:
    # offline (the default: a run folder under ckpt_dir/wandb, sync later with `wandb sync`), online, disabled
    mode: str = option("offline", choices=("offline", "online", "disabled"))
    project: str = "scldm-scale"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    stage: str = option("vae", choices=("vae", "ldm"))
    seed: int = option(0, "random seed (a run's initialisation and data order; generation's noise and library sizes)")
    data: DataConfig = field(default_factory=DataConfig)
    model: VAEConfig = field(default_factory=VAEConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    optim: StageOptimConfig = field(default_factory=StageOptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _choices(section: type, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Every field of `section` (and of its sections) that has choices, by dotted key."""
    out = {}
    hints = get_type_hints(section)
    for spec in fields(section):
        if is_dataclass(hints[spec.name]):
            out |= _choices(hints[spec.name], f"{prefix}{spec.name}.")
        elif spec.metadata.get("choices"):
            out[prefix + spec.name] = spec.metadata["choices"]
    return out


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> Config:
    """Check choices and cross-field constraints; raise ConfigError naming the key."""
    for key, choices in _choices(Config).items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    m = cfg.model
    for key, value in (("d_model", m.d_model), ("n_heads", m.n_heads), ("n_cross_heads", m.n_cross_heads)):
        if value <= 0:
            raise ConfigError(f"model.{key} must be positive, got {value}")
    for heads_key in ("n_heads", "n_cross_heads"):
        if m.d_model % getattr(m, heads_key):
            raise ConfigError(
                f"model.d_model={m.d_model} must be divisible by model.{heads_key}={getattr(m, heads_key)}"
            )
    if cfg.prior.d_model % cfg.prior.n_heads:
        raise ConfigError(f"prior.d_model={cfg.prior.d_model} must be divisible by prior.n_heads")
    if m.n_latent_tokens <= 0 or m.latent_dim <= 0 or m.n_layers < 0:
        raise ConfigError("model.n_latent_tokens and model.latent_dim must be positive, n_layers >= 0")
    if m.decode_genes != "all" and not (m.decode_genes.isdigit() and int(m.decode_genes) > 0):
        raise ConfigError(f"model.decode_genes must be 'all' or a positive number of genes, got {m.decode_genes!r}")
    if m.decode_chunk_genes < -1:
        raise ConfigError(f"model.decode_chunk_genes must be -1 (off), 0 (auto) or N > 0, got {m.decode_chunk_genes}")
    if cfg.data.path is not None and cfg.data.source != "h5ad":
        raise ConfigError(
            f"data.path is read by data.source=h5ad, but data.source={cfg.data.source}: add data.source=h5ad, or "
            "ingest the file with `scldm-scale prepare FILE --out URI` and pass data.uri=URI"
        )
    if cfg.data.chunk_size <= 0 or cfg.data.buffer_chunks <= 0 or cfg.data.num_workers < 0:
        raise ConfigError("data.chunk_size and data.buffer_chunks must be positive, data.num_workers >= 0")
    if cfg.data.group_buffers < 1:
        raise ConfigError(f"data.group_buffers must be >= 1 (buffers per read), got {cfg.data.group_buffers}")
    if cfg.data.n_zero_tokens < 0:
        raise ConfigError(f"data.n_zero_tokens must be >= 0, got {cfg.data.n_zero_tokens}")
    _validate_holdout(cfg.data)
    if not 0.0 < cfg.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {cfg.data.test_fraction}")
    if not 0.0 <= cfg.prior.cond_drop_prob <= 1.0:
        raise ConfigError(f"prior.cond_drop_prob must be in [0, 1], got {cfg.prior.cond_drop_prob}")
    if cfg.train.batch_size <= 0:
        raise ConfigError(f"train.batch_size must be positive, got {cfg.train.batch_size}")
    if not 0.0 <= cfg.train.balance_conditions <= 1.0:
        raise ConfigError(
            f"train.balance_conditions must be in [0, 1] (0: plain shuffle, 1: combinations equally often), "
            f"got {cfg.train.balance_conditions}"
        )
    if cfg.train.ckpt_every < 0 or cfg.train.keep_last < 1:
        raise ConfigError("train.ckpt_every must be >= 0 and train.keep_last >= 1")
    if cfg.train.max_steps is not None and cfg.train.max_steps <= 0:
        raise ConfigError(f"train.max_steps must be positive, got {cfg.train.max_steps}")
    if cfg.train.zero_stage not in (1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 1, 2 or 3, got {cfg.train.zero_stage}")
    if cfg.model.encoder_warmup_steps < 0:
        raise ConfigError(
            f"model.encoder_warmup_steps must be >= 0 (0: no warm-up), got {cfg.model.encoder_warmup_steps}"
        )
    if not 0.0 <= cfg.model.encoder_token_dropout < 1.0:
        raise ConfigError(
            f"model.encoder_token_dropout must be in [0, 1) (0: the encoder sees every token), "
            f"got {cfg.model.encoder_token_dropout}"
        )
    if cfg.model.pooling_weights != "uniform" and cfg.model.attention_backend != "torch":
        raise ConfigError(
            f"model.pooling_weights={cfg.model.pooling_weights} needs model.attention_backend=torch (SDPA with a key "
            "bias); for the Triton kernels set model.pooling_weights=uniform"
        )
    if cfg.model.fold_pooling and cfg.model.attention_backend != "triton":
        raise ConfigError("model.fold_pooling=true needs model.attention_backend=triton (it is a kernel of its own)")
    if cfg.train.init_on_meta and cfg.train.strategy != "fsdp":
        raise ConfigError("train.init_on_meta=true needs train.strategy=fsdp (it shards the model as it is built)")
    if cfg.train.grad_accum_steps < 1:
        raise ConfigError(f"train.grad_accum_steps must be >= 1, got {cfg.train.grad_accum_steps}")
    check_guidance_interval(cfg.sample.guidance_interval, "sample.guidance_interval")
    check_sde_noise(cfg.sample.sde_noise, "sample.sde_noise")
    if cfg.sample.n_steps < 1 or cfg.sample.batch_size < 1:
        raise ConfigError(
            f"sample.n_steps and sample.batch_size must be >= 1, got {cfg.sample.n_steps} and {cfg.sample.batch_size}"
        )
    if cfg.train.peak_tflops is not None and cfg.train.peak_tflops <= 0:
        raise ConfigError(f"train.peak_tflops must be positive, got {cfg.train.peak_tflops}")
    for stage in ("vae", "ldm"):
        o = getattr(cfg.optim, stage)
        if len(o.betas) != 2:
            raise ConfigError(f"optim.{stage}.betas must have two values, got {list(o.betas)}")
        if o.warmup_frac + o.decay_frac > 1.0:
            raise ConfigError(f"optim.{stage}.warmup_frac + decay_frac must be <= 1")
    if cfg.train.init_from and cfg.stage != "vae":
        raise ConfigError(
            "train.init_from fine-tunes a VAE (stage=vae); a prior on a trained VAE takes train.vae_checkpoint"
        )
    if cfg.train.init_gene_bias == "data" and (cfg.model.likelihood != "nb" or cfg.train.init_on_meta):
        raise ConfigError(
            "train.init_gene_bias=data sets the NB head's per-gene offsets of a model built in memory: it needs "
            "model.likelihood=nb and train.init_on_meta=false (or use train.init_gene_bias=zero)"
        )
    if cfg.train.init_from and cfg.train.init_on_meta:
        raise ConfigError("train.init_from copies weights into a built model: drop train.init_on_meta=true")
    if cfg.stage == "ldm" and not cfg.train.vae_checkpoint:
        raise ConfigError("stage=ldm needs train.vae_checkpoint=PATH (the model stage=vae wrote: <ckpt_dir>/vae-model)")
    return cfg


def _validate_holdout(data: DataConfig) -> None:
    seen: dict[frozenset, int] = {}
    for i, combination in enumerate(data.holdout_combinations):
        where = f"data.holdout_combinations[{i}]"
        if not combination:
            raise ConfigError(
                f"{where} is empty, which would hold out every cell; give key: value pairs, e.g. "
                f"{{{', '.join(f'{k}: VALUE' for k in data.condition_keys)}}}"
            )
        unknown = [k for k in combination if k not in data.condition_keys]
        if unknown:
            raise ConfigError(
                f"{where} has keys {unknown} that are not data.condition_keys {list(data.condition_keys)}; "
                "a held-out combination is made of condition values"
            )
        not_text = {k: v for k, v in combination.items() if not isinstance(v, str)}
        if not_text:
            raise ConfigError(f"{where}: values must be strings (condition labels), got {not_text}")
        items = frozenset(combination.items())
        if items in seen:
            raise ConfigError(f"{where} repeats data.holdout_combinations[{seen[items]}]: {dict(combination)}")
        seen[items] = i


def _friendly(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigAttributeError | ConfigKeyError):
        return f"unknown config key '{key}': check its spelling against configs/quickstart.yaml"
    if isinstance(err, ValidationError):
        return f"wrong type for config key '{key}': {str(err.msg).splitlines()[0]}"
    return f"invalid configuration at '{key}': {err.msg if hasattr(err, 'msg') else err}"


def _config_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists() and "configs" in path.parts:
        # `configs/...yaml` from outside the repository root: the file under this checkout's configs/.
        parts = path.parts
        below = parts[len(parts) - parts[::-1].index("configs") :]
        if below and CONFIG_DIR.joinpath(*below).exists():
            path = CONFIG_DIR.joinpath(*below)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    return path


def load_config(
    paths: str | Path | Sequence[str | Path] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Merge schema defaults <- YAML file(s), left to right <- dot-list overrides, then validate.

    Several files compose a run, e.g. configs/quickstart.yaml then a size preset from configs/model/.
    """
    if paths is None:
        paths = []
    elif isinstance(paths, str | Path):
        paths = [paths]
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        for path in paths:
            path = _config_file(path)
            try:
                merged = OmegaConf.merge(merged, OmegaConf.load(path))
            except OmegaConfBaseException as err:
                raise ConfigError(f"{path}: {_friendly(err)}") from None
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_friendly(err)) from None
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def section_from_dict(schema: type, data: dict, where: str):
    """Rebuild one schema section (e.g. VAEConfig) from a model artifact's stored dict, strictly."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"{where}: stored config does not fit this version of scldm-scale ({_friendly(err)}); "
            "retrain with this version or use the version that wrote the model"
        ) from None


def stage_optim(cfg: Config, stage: str) -> OptimConfig:
    optim = getattr(cfg.optim, stage)
    if cfg.train.max_steps is not None:
        optim = OptimConfig(**{**optim.__dict__, "max_steps": cfg.train.max_steps})
    return optim


# --- The command line: flags are views of the schema's fields ---------------------------------------------


def comma_separated(text: str) -> list[str]:
    """'a,b,' -> ['a', 'b']; '' -> []."""
    return [item for item in text.split(",") if item]


def _flag_type(hint: Any) -> Any:
    """The argparse `type` of a field's annotation: `int | None` -> int, `list[str]` -> list."""
    if get_origin(hint) is list:
        return list
    if get_origin(hint) in (Union, types.UnionType):
        return _flag_type(next(arg for arg in get_args(hint) if arg is not type(None)))
    return hint


def add_option(parser: argparse.ArgumentParser, section: type, name: str, *flags: str, **kwargs: Any) -> None:
    """Declare a flag (default --name-with-dashes) as a view of the field `name` of the schema `section`.

    Its default, type, choices and help come from the field, its value lands in args.<name>; a bool field
    is a switch that flips its default, a list field takes comma-separated values, or one value per use
    with action="append". `kwargs` go to argparse as they are (e.g. required=True, metavar=...).
    """
    spec = next(spec for spec in fields(section) if spec.name == name)
    default = spec.default_factory() if spec.default is MISSING else spec.default
    kind = _flag_type(get_type_hints(section)[name])
    flags = flags or (f"--{name.replace('_', '-')}",)
    view: dict[str, Any] = {"dest": name, "default": default, "help": spec.metadata.get("help", "")}
    if kind is bool:
        view["action"] = "store_false" if default else "store_true"
        view["help"] = f"do not {view['help']}" if default else view["help"]
    elif kwargs.get("action") == "append":
        view |= {"type": str, "metavar": "VALUE"}
    elif kind is list:
        # Shown and parsed as the command line spells it (argparse passes a text default through `type`).
        view |= {"type": comma_separated, "default": ",".join(map(str, default)), "metavar": "A,B"}
    elif spec.metadata.get("choices"):
        view |= {"type": kind, "choices": spec.metadata["choices"]}
    else:
        view |= {"type": kind, "metavar": flags[0].lstrip("-").upper().replace("-", "_")}
    parser.add_argument(*flags, **(view | kwargs))


def add_options(parser: argparse.ArgumentParser, section: type, **flags: str) -> None:
    """Every field of `section` as a flag (`add_option`); `flags` renames some, e.g. n_latents="--latents"."""
    for spec in fields(section):
        add_option(parser, section, spec.name, *[flags[spec.name]] if spec.name in flags else [])


def from_flags(section: type, args: argparse.Namespace, **values: Any) -> Any:
    """The `section` that the flags declared by `add_option` (and `values`, which win) describe."""
    given = {spec.name: getattr(args, spec.name) for spec in fields(section) if hasattr(args, spec.name)}
    return section(**(given | values))


def parse_pairs(items: Sequence[str], flag: str, cast: Callable[[str], Any] = str) -> dict[str, Any]:
    """['k=v', ...] from a repeatable flag -> {k: cast(v)}; a malformed item or a key given twice is a
    ConfigError naming `flag`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        if key in out:  # the last one would silently win
            raise ConfigError(f"{flag} gives {key!r} twice; give each key once (run once per value for several)")
        try:
            out[key] = cast(value)
        except ValueError:
            raise ConfigError(f"{flag} {item!r}: {value!r} is not a number") from None
    return out


def parse_ints(text: str, flag: str) -> list[int]:
    """'2048,8192' from `flag` -> [2048, 8192]; anything else is a ConfigError naming `flag`."""
    return _parse_numbers(text, flag, int, "integers, e.g. 2048,8192")


def parse_floats(text: str, flag: str) -> list[float]:
    """'0,0.5' from `flag` -> [0.0, 0.5]; anything else is a ConfigError naming `flag`."""
    return _parse_numbers(text, flag, float, "numbers, e.g. 0,0.5")


def _parse_numbers(text: str, flag: str, cast: Callable[[str], Any], expected: str) -> list:
    try:
        return [cast(item) for item in comma_separated(text)]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated {expected}; got {text!r}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The CONFIG [CONFIG ...] [key=value ...] positional of the commands that run a `Config`."""
    config_help = (
        "config files merged left to right, then dot-list overrides, e.g. configs/quickstart.yaml "
        "configs/model/vae_base.yaml model.n_layers=4 train.max_steps=200"
    )
    parser.add_argument("configs", nargs="+", metavar="CONFIG|key=value", help=config_help)


def split_config_args(items: list[str]) -> tuple[list[str], list[str]]:
    """CONFIG [CONFIG ...] [key=value ...]: .yaml/.yml files (merged left to right), then overrides."""
    paths = [item for item in items if "=" not in item and item.endswith((".yaml", ".yml"))]
    overrides = [item for item in items if "=" in item]
    stray = [item for item in items if item not in paths and item not in overrides]
    if stray:
        raise ConfigError(f"{stray} are neither config files (.yaml/.yml) nor key=value overrides")
    if not paths:
        raise ConfigError("give at least one config file, e.g. configs/quickstart.yaml")
    return paths, overrides
