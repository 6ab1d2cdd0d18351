"""`scldm-scale` / `python -m scldm_scale`: parse, then dispatch. Errors at this boundary print one
clear line (what is wrong and how to fix it) and exit with status 2, without a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from scldm_scale.config import ConfigError
from scldm_scale.data.counts import DataError
from scldm_scale.train.checkpoint import CheckpointError
from scldm_scale.world import get_rank, get_world_size

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def _pairs(items: list[str], flag: str, cast=str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = cast(value)
        except ValueError:
            raise ConfigError(f"{flag} {item!r}: {value!r} is not a number") from None
    return out


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


def cmd_train(args: argparse.Namespace) -> None:
    from scldm_scale.config import load_config
    from scldm_scale.train.stages import run_training

    cfg = load_config(*split_config_args(args.configs))
    path = run_training(cfg)
    if get_rank() == 0:
        print(f"checkpoint: {path}")


def cmd_export(args: argparse.Namespace) -> None:
    from scldm_scale.train.export import convert_legacy, export

    if args.from_legacy:
        if args.out is None:
            raise ConfigError("--from-legacy needs --out DIR, the artifact folder to write")
        out = convert_legacy(args.source, args.out)
    else:
        out = export(args.source, args.out)
    print(f"model: {out}  (generate with: scldm-scale generate {out} ...)")


def cmd_generate(args: argparse.Namespace) -> None:
    from scldm_scale.generate import generate

    condition = _pairs(args.condition, "--condition")
    guidance = _pairs(args.cfg, "--cfg", float)
    if args.n_cells <= 0:
        raise ConfigError(f"--n-cells must be positive, got {args.n_cells}")
    # Made before sampling, so a bad --out fails now rather than after the whole run.
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)
    try:
        adata = generate(
            args.checkpoint,
            [(condition, args.n_cells)],
            guidance=guidance,
            method=args.sampler,
            n_steps=args.steps,
            seed=args.seed,
            device=args.device,
        )
    except ValueError as err:
        if isinstance(err, USER_ERRORS):
            raise
        raise ConfigError(str(err)) from None
    adata.write_h5ad(args.out)
    print(f"wrote {adata.n_obs} cells x {adata.n_vars} genes to {args.out}")


def cmd_embed(args: argparse.Namespace) -> None:
    from scldm_scale.evaluate.embed import EMBED_KEY, POOLED_KEY, embed

    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)
    adata = embed(
        args.checkpoint,
        args.input,
        batch_size=args.batch_size,
        device=args.device,
        allow_missing_genes=args.allow_missing_genes,
        layer=args.layer,
    )
    adata.write_h5ad(args.out)
    shapes = f"obsm {EMBED_KEY} {adata.obsm[EMBED_KEY].shape}, {POOLED_KEY} {adata.obsm[POOLED_KEY].shape}"
    print(f"wrote {adata.n_obs} cells to {args.out}: {shapes}")


def cmd_classify(args: argparse.Namespace) -> None:
    from scldm_scale.evaluate.classify import classify

    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.rare_max_train is not None and args.rare_max_train < 1:
        raise ConfigError(f"--rare-max-train must be at least 1, got {args.rare_max_train}")
    result = classify(
        args.checkpoint,
        args.data,
        args.label_key,
        args.out,
        split_key=args.split_key,
        generated=args.generated,
        rare_classes=[c for c in args.rare_classes.split(",") if c] if args.rare_classes else None,
        rare_max_train=args.rare_max_train,
        batch_size=args.batch_size,
        device=args.device,
        allow_missing_genes=args.allow_missing_genes,
        layer=args.layer,
    )
    print((Path(args.out) / "classify.md").read_text())
    print(f"wrote {len(result['records'])} records to {args.out}/classify.json and classify.md")


def cmd_prepare(args: argparse.Namespace) -> None:
    from scldm_scale.data.prepare import prepare

    labels = [k for k in args.labels.split(",") if k] if args.labels else []
    out = prepare(
        args.input,
        args.out,
        layer=args.layer,
        labels=labels,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        seed=args.seed,
        zero_cells=args.zero_cells,
        allow_non_integer=args.allow_non_integer,
        overwrite=args.overwrite,
        append=args.append,
    )
    print(f"SOMA experiment: {out}  (train with data.uri={out})")


def cmd_bench_loader(args: argparse.Namespace) -> None:
    from scldm_scale.bench.loader import run_loader_bench

    workers = [int(w) for w in args.workers.split(",") if w]
    run_loader_bench(
        n_cells=args.cells,
        n_genes=args.genes,
        batch_size=args.batch_size,
        workers=workers,
        json_path=args.json,
        work_dir=args.dir,
        seed=args.seed,
    )


def cmd_bench_step(args: argparse.Namespace) -> None:
    from scldm_scale.bench.step import run_step_bench

    try:
        run_step_bench(
            sizes=[s for s in args.models.split(",") if s],
            strategies=[s for s in args.strategies.split(",") if s],
            nproc=args.nproc,
            global_batch=args.global_batch,
            steps=args.steps,
            warmup=args.warmup,
            json_path=args.json,
            work_dir=args.dir,
            device=args.device,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated integers, e.g. 2048,8192; got {text!r}") from None


def _kernel_shape(args: argparse.Namespace) -> dict:
    """The shape and mode options `bench kernels` and `profile-kernels` share (see _add_kernel_shape_args)."""
    shape = dict(cells=args.cells, heads=args.heads, n_latents=args.latents, head_dim=args.head_dim)
    return shape | dict(dtype=args.dtype, smoke=args.smoke)


def cmd_bench_kernels(args: argparse.Namespace) -> None:
    from scldm_scale.bench.kernels import run_kernel_bench

    ops = tuple(op for op in args.ops.split(",") if op)
    genes = _int_list(args.genes, "--genes")
    try:
        run_kernel_bench(
            genes=genes, ops=ops, warmup=args.warmup, reps=args.reps, json_path=args.json, **_kernel_shape(args)
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def cmd_profile_kernels(args: argparse.Namespace) -> None:
    from scldm_scale.profile import profile_kernels

    try:
        profile_kernels(args.out, genes=args.genes, reps=args.reps, top=args.top, **_kernel_shape(args))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def cmd_profile_step(args: argparse.Namespace) -> None:
    from scldm_scale.profile import profile_step

    paths, overrides = split_config_args(args.configs)
    try:
        profile_step(paths, overrides, args.out, steps=args.steps, warmup=args.warmup, top=args.top)
    except ValueError as err:
        if isinstance(err, USER_ERRORS):
            raise
        raise ConfigError(str(err)) from None


def cmd_plan(args: argparse.Namespace) -> None:
    from scldm_scale.plan import run_plan

    paths, overrides = split_config_args(args.configs)
    run_plan(paths, overrides, args.world_size, args.strategy, args.n_genes, args.tokens_per_cell, args.json)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from scldm_scale.evaluate.run import EvalOptions, Holdout, evaluate, read_cells, split_real

    holdout = Holdout(
        [_pairs(c.split(","), "--holdout") for c in args.holdout],
        args.perturbation_key,
        args.context_key,
        args.control_value,
    )
    opts = EvalOptions(
        condition_keys=args.condition_key,
        baselines=[b for b in args.baselines.split(",") if b],
        holdout=holdout,
        intersect_genes=args.intersect_genes,
        n_pcs=args.n_pcs,
        n_hvg=args.n_hvg,
        seed=args.seed,
        scvi_epochs=args.scvi_epochs,
        vae_checkpoint=args.vae_checkpoint,
        plots=not args.no_plots,
    )
    real = read_cells(args.real, "real", args.layer)
    train = read_cells(args.train, "train", args.layer) if args.train else None
    if train is None and (parts := split_real(real, args.split_key, holdout.combinations)) is not None:
        train, real = parts
    evaluate(real, read_cells(args.generated, "generated"), args.out, opts, train=train)
    print(f"wrote {args.out}/metrics.json, report.md and the figures")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from scldm_scale.quickstart import run_quickstart

    report = run_quickstart(args.out, args.overrides, config=args.config)
    print((Path(args.out) / "report.md").read_text())
    print(
        f"wrote {args.out}/generated.h5ad, metrics.json, report.md, report.json and the figures "
        f"in {report['timings']['total_s']:.0f} s"
    )


def _add_kernel_shape_args(p: argparse.ArgumentParser) -> None:
    smoke_help = "tiny shapes on the CPU under the Triton interpreter (automatic without CUDA): no timing meaning"
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--cells", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--latents", type=int, default=32, help="latent tokens M")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])


def _add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=256, help="cells per encoder batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layer", default=None, help="layer of an .h5ad input with raw counts (default: X)")
    missing_help = "encode when the input lacks some of the model's genes (they become absent tokens)"
    p.add_argument("--allow-missing-genes", action="store_true", help=missing_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scldm-scale", description="Single-cell latent diffusion at scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    config_help = (
        "config files merged left to right, then dot-list overrides, e.g. configs/quickstart.yaml "
        "configs/model/vae_base.yaml model.n_layers=4 train.max_steps=200"
    )
    p = sub.add_parser("train", help="train one stage: scldm-scale train CONFIG.yaml [PRESET.yaml] stage=vae key=value")
    p.add_argument("configs", nargs="+", metavar="CONFIG|key=value", help=config_help)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="parameters, FLOPs per cell and memory per rank of a config, per strategy")
    p.add_argument("configs", nargs="+", metavar="CONFIG|key=value", help=config_help)
    p.add_argument("--world-size", type=int, default=8, help="ranks the sharded strategies divide by (default 8)")
    p.add_argument("--strategy", default="all", choices=["single", "ddp", "fsdp", "deepspeed", "all"])
    p.add_argument("--n-genes", type=int, default=None, help="genes in the vocabulary (default 2000; from the data)")
    p.add_argument("--tokens-per-cell", type=int, default=None, help="encoder tokens per cell (default 10%% of genes)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the plan here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", help="sample cells from an ldm checkpoint into an .h5ad")
    p.add_argument("checkpoint")
    p.add_argument("--n-cells", type=int, required=True)
    p.add_argument("--condition", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    p.add_argument("--cfg", action="append", default=[], metavar="KEY=WEIGHT", help="guidance weight per condition")
    p.add_argument("--sampler", default="heun", choices=["euler", "heun", "dopri5"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="generated vs real cells: metrics per condition, baselines, report, plots")
    p.add_argument("--real", required=True, help="real cells: .h5ad of counts or a SOMA experiment folder")
    p.add_argument("--generated", required=True, help="generated cells: .h5ad of counts")
    p.add_argument("--train", help="real training cells: the baselines and the PCA are fitted on them")
    p.add_argument("--layer", help="the layer of --real / --train that holds raw counts (default X)")
    p.add_argument(
        "--split-key",
        default="split",
        help="without --train, a --real column with train/test values splits it into training and real cells",
    )
    p.add_argument("--condition-key", action="append", default=[], help="obs column of conditions (repeatable)")
    p.add_argument("--intersect-genes", action="store_true", help="evaluate on the shared genes only")
    p.add_argument(
        "--baselines", default="real_train_cells,independent_nb,scvi,additive_shift", help="comma-separated, or ''"
    )
    p.add_argument(
        "--holdout",
        action="append",
        default=[],
        help="a combination held out of training, e.g. cell_line=A,perturbation=P (repeatable)",
    )
    p.add_argument("--perturbation-key", default="perturbation")
    p.add_argument("--context-key", default="cell_line")
    p.add_argument("--control-value", default="control")
    p.add_argument("--vae-checkpoint", help="VAE or LDM checkpoint: adds its reconstruction of the real cells")
    p.add_argument("--n-pcs", type=int, default=30)
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--scvi-epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("embed", help="posterior-mean latents of cells (.h5ad or SOMA) -> obsm of an .h5ad")
    p.add_argument("checkpoint", help="a vae or ldm checkpoint")
    p.add_argument("input", help=".h5ad of raw counts, or a SOMA experiment URI")
    _add_embed_args(p)
    p.add_argument("--out", required=True, help="output .h5ad: the input's obs, obsm X_scldm and X_scldm_pooled")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("classify", help="label classification from scLDM latents vs PCA, optionally augmented")
    p.add_argument("checkpoint", help="a vae or ldm checkpoint")
    p.add_argument("data", help=".h5ad of raw counts, or a SOMA experiment URI, with the labels in obs")
    p.add_argument("--label-key", required=True, help="obs column to predict, e.g. cell_type")
    p.add_argument("--split-key", default="split", help="obs column with train/test (else a stratified 80/20 split)")
    p.add_argument("--generated", default=None, help="generated cells (.h5ad, labels in obs) to add to rare classes")
    rare = p.add_mutually_exclusive_group()
    rare.add_argument("--rare-classes", default=None, metavar="A,B", help="the classes to augment")
    rare.add_argument(
        "--rare-max-train", type=int, default=None, metavar="N", help="augment classes with <= N train cells"
    )
    _add_embed_args(p)
    p.add_argument("--out", required=True, help="folder for classify.json and classify.md")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("prepare", help="ingest .h5ad / 10x .h5 / Matrix Market folder / CSV into a SOMA experiment")
    p.add_argument("input")
    p.add_argument("--out", required=True, help="URI (folder) of the new SOMA experiment")
    p.add_argument("--layer", default=None, help="layer with raw counts (default: X)")
    p.add_argument("--labels", default="", help="comma-separated obs columns to keep, e.g. cell_type,tissue")
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zero-cells", choices=["drop", "refuse"], default="drop", help="cells with zero counts")
    p.add_argument("--allow-non-integer", action="store_true", help="accept non-integer values (not raw counts)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing experiment at --out")
    p.add_argument("--append", action="store_true", help="add these cells to the experiment at --out")
    p.set_defaults(func=cmd_prepare)

    bench = sub.add_parser("bench", help="benchmarks: print a table, write JSON").add_subparsers(
        dest="bench", required=True
    )
    p = bench.add_parser("loader", help="our SOMA loader vs tiledbsoma-ml on a synthetic experiment")
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--dir", default=None, help="where to build the experiment (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench_loader)

    p = sub.add_parser(
        "export", help="a training step folder (any strategy, any rank count) or a 0.1 .pt -> a model artifact folder"
    )
    p.add_argument("source", help="a step folder, e.g. runs/x/vae/step-1000; a .pt with --from-legacy")
    p.add_argument("--out", default=None, help="the artifact folder (default: <ckpt_dir>/<stage>-model-step-N)")
    p.add_argument(
        "--from-legacy",
        action="store_true",
        help="convert a single-file vae.pt / ldm.pt of scldm-scale 0.1 (read with torch's restricted unpickler)",
    )
    p.set_defaults(func=cmd_export)

    p = bench.add_parser("step", help="training cells/s and memory per rank: single vs ddp vs fsdp vs deepspeed")
    p.add_argument("--models", default="vae-S,vae-M,prior-S,prior-M", help="comma-separated, of the defaults")
    p.add_argument("--strategies", default="single,fsdp,deepspeed-zero3", help="single,ddp,fsdp,deepspeed-zero3")
    p.add_argument("--nproc", type=int, default=2, help="processes for the sharded strategies")
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--dir", default=None, help="run folders (default: a temp dir)")
    p.set_defaults(func=cmd_bench_step)

    p = bench.add_parser("kernels", help="Triton kernels vs SDPA backends, FlexAttention and eager NB loss")
    _add_kernel_shape_args(p)
    genes_help = "comma-separated gene counts G: keys of pooling, queries of unpooling, the NB loss's width"
    p.add_argument("--genes", default="2048,8192,20000", help=genes_help)
    p.add_argument("--ops", default="pooling,unpooling,nb_loss", help="comma-separated subset")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None, metavar="OUT", help="write the records here")
    p.set_defaults(func=cmd_bench_kernels)

    p = sub.add_parser("profile-kernels", help="torch.profiler trace and time table of the Triton kernels")
    _add_kernel_shape_args(p)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--out", default="profile_kernels", help="folder for kernels_trace.json and kernels_table.txt")
    p.add_argument("--reps", type=int, default=3, help="traced rounds of every kernel")
    p.add_argument("--top", type=int, default=25, help="rows of the time table")
    p.set_defaults(func=cmd_profile_kernels)

    p = sub.add_parser("profile-step", help="torch.profiler trace and time table of training steps of a config")
    p.add_argument("configs", nargs="+", metavar="CONFIG|key=value", help=config_help)
    p.add_argument("--out", default="profile_step", help="folder for step_trace.json and step_table.txt")
    p.add_argument("--steps", type=int, default=5, help="traced training steps")
    p.add_argument("--warmup", type=int, default=3, help="untraced training steps before them")
    p.add_argument("--top", type=int, default=25, help="rows of the time table")
    p.set_defaults(func=cmd_profile_step)

    p = sub.add_parser("quickstart", help="train both stages on built-in data, generate, evaluate, report")
    p.add_argument("--out", default="quickstart_out")
    p.add_argument(
        "--config", default=None, help="a demo config (default configs/quickstart.yaml; configs/perturbation.yaml)"
    )
    p.add_argument("overrides", nargs="*", help="dot-list overrides of the config")
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Under torchrun, rank 0 logs progress; every rank logs warnings and errors, tagged with its rank.
    tag = f"[rank {get_rank()}] " if get_world_size() > 1 else ""
    level = logging.INFO if get_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`plan CONFIG --world-size 8 key=value`) still belong to CONFIG.
    if extra and hasattr(args, "configs") and all("=" in item and not item.startswith("-") for item in extra):
        args.configs += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from scldm_scale.train.trainer import TrainingInterrupted

    try:
        args.func(args)
    except USER_ERRORS as err:
        print(f"scldm-scale {args.command}: {tag}error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        if get_rank() == 0:
            print(f"scldm-scale {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0
