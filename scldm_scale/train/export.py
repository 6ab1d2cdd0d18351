"""`scldm-scale export`: a training step folder of any strategy, or a scldm-scale 0.1 `.pt`, -> a model artifact.

A 0.1 `.pt` (`--from-legacy`) is read with torch's restricted unpickler and mapped onto the artifact.

Step folders hold sharded weights (a DCP checkpoint for single/ddp/fsdp, DeepSpeed's ZeRO files for
deepspeed) plus the artifact's other parts (`to_parts` of the stage's artifact without its trained
weights). Export consolidates the shards in one process, without torch.distributed, on the CPU, and
writes the artifact folder `generate`, `embed`, `evaluate` and `classify` read.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from scldm_scale import artifact
from scldm_scale.artifact import (
    KINDS,
    Artifact,
    CheckpointError,
    LDMArtifact,
    Provenance,
    VAEArtifact,
    json_ready,
)
from scldm_scale.config import ConfigError, PriorConfig, VAEConfig, section_from_dict
from scldm_scale.data.batch import LabelEncoder, TokenPolicy
from scldm_scale.data.vocab import GeneVocabulary
from scldm_scale.models.library_size import LibrarySizeModel
from scldm_scale.outputs import add_overwrite, claim_output
from scldm_scale.train.checkpoint import dcp_failure, load_step_state
from scldm_scale.train.strategies import DEEPSPEED, EMA_FILE, WEIGHTS, ema_from_files

log = logging.getLogger(__name__)


def consolidated_weights(folder: Path) -> tuple[dict, dict | None]:
    """(model state, EMA state or None) of a step folder, full tensors on the CPU.

    A step folder is a training checkpoint: trusted input (DCP's metadata and DeepSpeed's files are
    pickles). Export your own runs; share the artifact it writes.
    """
    if (folder / WEIGHTS).is_dir():
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "full.pt"
            try:
                dcp_to_torch_save(str(folder / WEIGHTS), str(path))
            except (Exception, CheckpointException) as err:  # missing or truncated shard files
                raise CheckpointError(f"{folder / WEIGHTS} cannot be read: {dcp_failure(err)}") from None
            full = torch.load(path, map_location="cpu", weights_only=True)
        return full["model"], full.get("ema")
    if (folder / DEEPSPEED).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model = get_fp32_state_dict_from_zero_checkpoint(str(folder / DEEPSPEED), tag="state")
        return model, ema_from_files(folder) if (folder / EMA_FILE).exists() else None
    raise CheckpointError(f"{folder} holds no weights ({WEIGHTS}/ or {DEEPSPEED}/); is it a step folder?")


def export(folder: str | Path, out: str | Path | None = None, overwrite: bool = True) -> Path:
    """Write the stage's model artifact from a step folder; returns its path (default: beside the step
    folders, `<ckpt_dir>/<kind>-model-step-N`). An existing model at `out` is replaced only with
    `overwrite`, and `out` is checked (outputs.claim_output) before the weights are consolidated."""
    folder = Path(folder)
    state = load_step_state(folder)
    parts = state.get("export")
    if parts is None:
        raise CheckpointError(f"{folder} has no export information (written by a trainer without a stage)")
    if isinstance(parts[0], str):  # a scldm-scale 0.1 step folder: (kind, payload)
        kind, payload = parts
        skeleton = from_legacy_payload({"vae_state": {}, **payload, "kind": kind}, str(folder))
    else:
        skeleton = artifact.from_parts(*parts, where=str(folder))
    out = Path(out) if out is not None else folder.parent.parent / f"{skeleton.kind}-model-{folder.name}"
    claim_output(out, "a model artifact", "--out", overwrite, folder=True, marker=artifact.CONFIG_FILE)
    model_state, ema_state = consolidated_weights(folder)
    config = skeleton.training["config"]
    trained = skeleton.trained(
        model_state,
        ema_state,
        provenance=Provenance.of_run(config, state["step"], state["world_size"]),
        training={"config": config, "history": state["history"]},
    )
    # The weights must build the model they claim to be before anything is written.
    trained.build_prior() if isinstance(trained, LDMArtifact) else trained.build_vae()
    trained.save(out)
    log.info("exported %s (step %d, written by train.strategy=%s) to %s", folder, state["step"], state["strategy"], out)
    return out


def convert_legacy(path: str | Path, out: str | Path, overwrite: bool = True) -> Path:
    """A scldm-scale 0.1 single-file checkpoint (vae.pt / ldm.pt) -> an artifact folder; no pickle code runs."""
    claim_output(out, "a model artifact", "--out", overwrite, folder=True, marker=artifact.CONFIG_FILE)
    return from_legacy(path).save(out)


def from_legacy(path: str | Path) -> Artifact:
    """The artifact of a single-file `.pt` checkpoint written by scldm-scale 0.1 (`scldm-scale export
    --from-legacy`). It is read with torch's restricted unpickler (weights_only), which builds tensors,
    containers and numpy scalars and refuses every other global, so no code in the file can run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"legacy checkpoint {path} does not exist")
    # numpy scalars pickle as numpy._core.multiarray.scalar (numpy 2) or numpy.core.multiarray.scalar (1.x).
    scalar = getattr(np, "_core", np.core).multiarray.scalar
    names = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
    allowed = [*((scalar, name) for name in names), np.dtype, *(type(np.dtype(c)) for c in "fdilbU")]
    try:
        with torch.serialization.safe_globals(allowed):
            legacy = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the restricted unpickler raises UnpicklingError; torch others for non-torch files
        reason = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
        raise CheckpointError(f"{path} is not a loadable scldm-scale 0.1 checkpoint (refused: {reason})") from None
    if not isinstance(legacy, dict) or legacy.get("format") != "scldm-scale" or legacy.get("kind") not in KINDS:
        raise CheckpointError(f"{path} is not a single-file scldm-scale checkpoint (vae.pt / ldm.pt)")
    return from_legacy_payload(legacy, str(path))


def from_legacy_payload(legacy: dict, where: str) -> Artifact:
    """The artifact of a scldm-scale 0.1 checkpoint dict (a `.pt` file's content, or a 0.1 step folder's
    export payload with its weights added): kind, vae_config, vae_state, gene_names, condition_encoders,
    library_size, config, step, history; an ldm adds prior_config, n_classes, latent_mean/std, prior_state,
    prior_ema_state."""
    legacy = json_ready(legacy)
    config = legacy["config"]
    data = config["data"]
    vae = VAEArtifact(
        config=section_from_dict(VAEConfig, legacy["vae_config"], f"{where} VAE config"),
        genes=GeneVocabulary(legacy["gene_names"]),
        encoders={k: LabelEncoder(k, s["values"]) for k, s in legacy["condition_encoders"].items()},
        library_size=LibrarySizeModel.from_state(legacy["library_size"]),
        token_policy=TokenPolicy(data.get("gene_tokens", "expressed"), int(data.get("n_zero_tokens", 0))),
        weights=legacy["vae_state"],
        allow_non_integer=bool(data.get("allow_non_integer", False)),
    )
    # 0.1 did not record the number of ranks: cells_seen counts one rank's cells.
    provenance = Provenance.of_run(config, int(legacy.get("step", 0)), world_size=1)
    record = {
        "provenance": replace(provenance, package_version="0.1 (converted)", git_revision=None, created=""),
        "training": {"config": config, "history": legacy.get("history", [])},
    }
    if legacy["kind"] == "vae":
        return replace(vae, **record)
    return LDMArtifact(
        vae=vae,
        prior_config=section_from_dict(PriorConfig, legacy["prior_config"], f"{where} prior config"),
        n_classes={k: int(v) for k, v in legacy["n_classes"].items()},
        latent_mean=legacy["latent_mean"],
        latent_std=legacy["latent_std"],
        prior_weights=legacy.get("prior_state", {}),  # a 0.1 step folder's payload has its weights apart
        prior_ema_weights=legacy.get("prior_ema_state") or {},
        **record,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale export`."""
    parser.add_argument("source", help="a step folder, e.g. runs/x/vae/step-1000; a .pt with --from-legacy")
    parser.add_argument("--out", default=None, help="the artifact folder (default: <ckpt_dir>/<stage>-model-step-N)")
    legacy_help = "convert a single-file vae.pt / ldm.pt of scldm-scale 0.1 (read with torch's restricted unpickler)"
    parser.add_argument("--from-legacy", action="store_true", help=legacy_help)
    add_overwrite(parser, "the model artifact at --out")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    if args.from_legacy:
        if args.out is None:
            raise ConfigError("--from-legacy needs --out DIR, the artifact folder to write")
        out = convert_legacy(args.source, args.out, args.overwrite)
    else:
        out = export(args.source, args.out, args.overwrite)
    print(f"model: {out}  (generate with: scldm-scale generate {out} ...)")
