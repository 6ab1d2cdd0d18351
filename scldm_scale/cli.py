"""`scldm-scale` / `python -m scldm_scale`: parse, then dispatch.

Each command declares its own arguments beside its code: `COMMANDS` names the function that does it
(`add_arguments(parser)`, which also sets `handle`, the function the parsed arguments go to). Only the
module of the command being run is imported. Options that mirror a config field are views of it
(`config.add_option`), so `--help` shows the schema's defaults.

Errors at this boundary (ConfigError, DataError, CheckpointError, raised where the problem is found)
print one clear line (what is wrong and how to fix it) and exit with status 2, without a traceback; so
does a file operation the system refuses (a full disk, a read-only file system, a missing permission).
Ctrl-C prints one line and exits with 130 (while torch and the command's module load, once they have
loaded: stopping.py). Anything else is a bug of scldm-scale: its traceback is
printed, followed by one line asking to report it. `--debug` (before or after the command) shows the
traceback of every error, refusals included.
"""

from __future__ import annotations

# Only the standard library at import time: torch and the commands' modules load inside main(), within
# its Ctrl-C handling (loading them takes seconds, and an interrupt then must not end in a traceback).
import argparse
import errno
import importlib
import logging
import sys
import traceback

from scldm_scale.stopping import DeferredInterrupt, end_process

# File operations the system refuses for reasons outside scldm-scale: reported in one line, not as a bug.
SYSTEM_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
REPORT_TO = "the scldm-scale issue tracker (the repository's Issues page)"
INTERRUPTED = 130  # the exit status after Ctrl-C (SIGINT), as a shell reports a process it killed
DEBUG_HELP = "show the full traceback of any error, refusals included"

# "command" or "group command": (the function that declares its arguments, its one-line help)
COMMANDS = {
    "prepare": (
        "scldm_scale.data.prepare:add_arguments",
        "ingest .h5ad / 10x .h5 / Matrix Market folder / CSV into a SOMA experiment",
    ),
    "synthetic-census": (
        "scldm_scale.data.census:add_arguments",
        "write a synthetic experiment laid out like the CELLxGENE Census (scale checks)",
    ),
    "train": (
        "scldm_scale.train.stages:add_arguments",
        "train one stage: scldm-scale train CONFIG.yaml [PRESET.yaml] stage=vae key=value",
    ),
    "plan": (
        "scldm_scale.plan:add_arguments",
        "parameters, FLOPs per cell and memory per rank of a config, per strategy",
    ),
    "export": (
        "scldm_scale.train.export:add_arguments",
        "a training step folder (any strategy, any rank count) or a 0.1 .pt -> a model artifact folder",
    ),
    "generate": ("scldm_scale.generate:add_arguments", "sample cells from an ldm model into an .h5ad"),
    "evaluate": (
        "scldm_scale.evaluate.run:add_arguments",
        "generated vs real cells: metrics per condition, baselines, report, plots",
    ),
    "embed": (
        "scldm_scale.evaluate.embed:add_arguments",
        "posterior-mean latents of cells (.h5ad or SOMA) -> obsm of an .h5ad",
    ),
    "classify": (
        "scldm_scale.evaluate.classify:add_arguments",
        "label classification from scLDM latents vs PCA, optionally augmented",
    ),
    "quickstart": (
        "scldm_scale.quickstart:add_arguments",
        "train both stages on built-in data or your --data, generate, evaluate, report",
    ),
    "synthetic": (
        "scldm_scale.data.synthetic:add_arguments",
        "write a seeded whole-transcriptome NB count .h5ad (cell types, donors) to try quickstart --data on",
    ),
    "bench loader": (
        "scldm_scale.bench.loader:add_arguments",
        "our SOMA loader vs tiledbsoma-ml on a synthetic experiment",
    ),
    "bench step": (
        "scldm_scale.bench.step:add_arguments",
        "training cells/s and memory per rank: single vs ddp vs fsdp vs deepspeed",
    ),
    "bench kernels": (
        "scldm_scale.bench.kernels:add_arguments",
        "Triton kernels vs SDPA backends, FlexAttention and eager NB loss",
    ),
    "bench gpu": ("scldm_scale.bench.gpu:add_arguments", "the GPU check: kernel correctness, kernels, steps, curves"),
    "profile-kernels": (
        "scldm_scale.profile:add_kernels_arguments",
        "torch.profiler trace and time table of the Triton kernels",
    ),
    "profile-step": (
        "scldm_scale.profile:add_step_arguments",
        "torch.profiler trace and time table of training steps of a config",
    ),
}
GROUPS = {"bench": "benchmarks: print a table, write JSON"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default where there is one to show (not for switches, required or empty ones)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.nargs == 0 or action.default in (None, "", []):
            return action.help
        return super()._get_help_string(action)


def _declare(parser: argparse.ArgumentParser, target: str) -> None:
    module, function = target.split(":")
    getattr(importlib.import_module(module), function)(parser)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; given `command` (the first word of a command line, the first two for a
    group's command: "bench gpu"), only that command declares its arguments, so that running it imports its
    own module and no other (a group alone, "bench", declares all of the group's)."""
    parser = argparse.ArgumentParser(prog="scldm-scale", description="Single-cell latent diffusion at scale.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    groups = {
        name: sub.add_parser(name, help=text).add_subparsers(dest=name, required=True) for name, text in GROUPS.items()
    }
    for name, (target, text) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        p = (groups[group] if group else sub).add_parser(leaf, help=text, formatter_class=HelpFormatter)
        # Also after the command; SUPPRESS keeps a --debug given before it.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        if command in (None, name, name.split()[0]):
            _declare(p, target)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """The refusals of user input, raised where the problem is found."""
    from scldm_scale.artifact import CheckpointError
    from scldm_scale.config import ConfigError
    from scldm_scale.data.counts import DataError

    return ConfigError, DataError, CheckpointError


def main(argv: list[str] | None = None) -> int:
    process_entry = argv is None  # main([...]) in a test or a notebook keeps the caller's thread settings
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = _run(argv, process_entry)
    except KeyboardInterrupt as err:  # Ctrl-C while modules load or arguments parse, before the command runs
        code = _report(err, "scldm-scale: ", "--debug" in argv)
    # After Ctrl-C, and after a process group ran, the process ends without interpreter finalization: it
    # could turn 130 into a death by SIGINT (stopping.py), and a collective's worker thread can abort it
    # (distributed.end_process). `distributed` is only imported if a command used it.
    distributed = sys.modules.get("scldm_scale.train.distributed")
    if process_entry and distributed is not None and distributed.started_a_group():
        distributed.end_process(code)
    if process_entry and code == INTERRUPTED:
        end_process(code)
    return code


def _run(argv: list[str], process_entry: bool) -> int:
    # Ctrl-C while torch and the command's module load (seconds) is acted on once they have: raised inside
    # their native imports it can crash or hang the process instead (stopping.py).
    with DeferredInterrupt():
        from scldm_scale.threads import use_free_cores
        from scldm_scale.world import StopRequested, get_rank

        args, name, tag = _load(argv)
    try:
        if process_entry:
            use_free_cores(args.command)  # compute commands: torch threads from the cores free now (threads.py)
        args.handle(args)
    except StopRequested as stop:
        if get_rank() == 0:
            print(f"scldm-scale {name}: {stop}", file=sys.stderr)
        return stop.exit_code
    except SystemExit:
        raise
    except BaseException as err:  # the boundary: every error ends in one line, or in a report
        return _report(err, f"scldm-scale {name}: {tag}", args.debug)
    return 0


def _load(argv: list[str]) -> tuple[argparse.Namespace, str, str]:
    """Import what the command needs and parse its arguments: (arguments, the command's name, the log tag)."""
    from scldm_scale.world import get_rank, get_world_size

    # Under torchrun, rank 0 logs progress; every rank logs warnings and errors, tagged with its rank.
    tag = f"[rank {get_rank()}] " if get_world_size() > 1 else ""
    level = logging.INFO if get_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
    words = [word for word in argv if not word.startswith("-")]
    # A group's command names two words: `bench gpu` declares (imports) its own module, not every benchmark's.
    command = " ".join(words[:2]) if len(words) > 1 and words[0] in GROUPS else (words[0] if words else "")
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`plan CONFIG --world-size 8 key=value`) still belong to CONFIG.
    if extra and hasattr(args, "configs") and all("=" in item and not item.startswith("-") for item in extra):
        args.configs += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    name = f"{args.command} {getattr(args, args.command)}" if args.command in GROUPS else args.command
    return args, name, tag


def _report(err: BaseException, prefix: str, debug: bool) -> int:
    """Print what went wrong, with the traceback for a bug (or any error under --debug); the exit status."""
    if isinstance(err, KeyboardInterrupt):
        if debug:
            traceback.print_exception(err)
        print(f"{prefix}interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED
    user_errors = _user_errors()
    refused = isinstance(err, user_errors) or (isinstance(err, OSError) and err.errno in SYSTEM_REFUSALS)
    if debug or not refused:
        traceback.print_exception(err)
    if isinstance(err, user_errors):
        print(f"{prefix}error: {err}", file=sys.stderr)
        return 2
    if refused:
        print(
            f"{prefix}error: the system refused a file operation: {err}; free space or fix permissions, or "
            "write elsewhere",
            file=sys.stderr,
        )
        return 2
    print(
        f"{prefix}internal error: {type(err).__name__}: {err} — this is a bug in scldm-scale; please report it "
        f"to {REPORT_TO} with the traceback above",
        file=sys.stderr,
    )
    return 1
