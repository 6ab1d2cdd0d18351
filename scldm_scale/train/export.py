"""`scldm-scale export STEP_FOLDER`: a training checkpoint of any strategy -> the single file `generate` reads.

Step folders hold sharded weights (a DCP checkpoint for single/ddp/fsdp, DeepSpeed's ZeRO files for
deepspeed) plus what the stage's final file needs besides the weights. Export consolidates the shards
in one process, without torch.distributed, on the CPU.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from scldm_scale.train.checkpoint import CheckpointError, dcp_failure, load_step_state, save_checkpoint
from scldm_scale.train.stages import exported_checkpoint
from scldm_scale.train.strategies import DEEPSPEED, EMA_FILE, WEIGHTS

log = logging.getLogger(__name__)


def consolidated_weights(folder: Path, strategy: str) -> tuple[dict, dict | None]:
    """(model state, EMA state or None) of a step folder, full tensors on the CPU."""
    if (folder / WEIGHTS).is_dir():
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "full.pt"
            try:
                dcp_to_torch_save(str(folder / WEIGHTS), str(path))
            except (Exception, CheckpointException) as err:  # missing or truncated shard files
                raise CheckpointError(f"{folder / WEIGHTS} cannot be read: {dcp_failure(err)}") from None
            full = torch.load(path, map_location="cpu", weights_only=False)
        return full["model"], full.get("ema")
    if (folder / DEEPSPEED).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model = get_fp32_state_dict_from_zero_checkpoint(str(folder / DEEPSPEED), tag="state")
        ema = None
        if (folder / EMA_FILE).exists():
            ema = torch.load(folder / EMA_FILE, map_location="cpu", weights_only=False)["shadow"]
        return model, ema
    raise CheckpointError(f"{folder} holds no weights ({WEIGHTS}/ or {DEEPSPEED}/); is it a step folder?")


def export(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the stage's single-file checkpoint from a step folder; returns its path."""
    folder = Path(folder)
    state = load_step_state(folder)
    if state.get("export") is None:
        raise CheckpointError(f"{folder} has no export information (written by a trainer without a stage)")
    kind, payload = state["export"]
    model_state, ema_state = consolidated_weights(folder, state["strategy"])
    model_state = {k: v.float() if v.is_floating_point() else v for k, v in model_state.items()}
    if kind == "vae":
        model_state = _with_tied_weights(payload, model_state, folder)
    out = Path(out) if out is not None else folder / f"{kind}.pt"
    data = exported_checkpoint(
        kind, {**payload, "step": state["step"], "history": state["history"]}, model_state, ema_state
    )
    save_checkpoint(out, kind, data)
    log.info("exported %s (step %d, written by train.strategy=%s) to %s", folder, state["step"], state["strategy"], out)
    return out


def _with_tied_weights(payload: dict, model_state: dict, folder: Path) -> dict:
    """DeepSpeed's consolidation keeps one name per shared tensor (the decoder's gene embedding is the
    encoder's when model.share_gene_embedding): rebuild the VAE to get every name the loader expects."""
    from scldm_scale.config import VAEConfig, section_from_dict
    from scldm_scale.models.vae import SetVAE

    vae_cfg = section_from_dict(VAEConfig, payload["vae_config"], "checkpoint VAE config")
    vae = SetVAE(vae_cfg, len(payload["gene_names"]))
    missing, unexpected = vae.load_state_dict(model_state, strict=False)
    tied = {"decoder_gene_embedding.weight"} if vae.decoder_gene_embedding is vae.gene_embedding else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{folder}: weights do not fit the VAE (missing {missing}, unexpected {unexpected})")
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}
