"""Weights & Biases logging (`logging.wandb`): offline by default, rank 0 only, resumable.

The run folder is `<train.ckpt_dir>/wandb`; an offline run is uploaded later with `wandb sync DIR`. The
run id is kept in `<train.ckpt_dir>/<stage>/wandb_run_id`, so a resumed training continues the same run.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from scldm_scale.config import Config, ConfigError, to_dict

log = logging.getLogger(__name__)
RUN_ID_FILE = "wandb_run_id"


class WandbTracker:
    def __init__(self, run):
        self.run = run

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])

    def finish(self) -> None:
        self.run.finish()


def start_tracker(cfg: Config, stage: str, is_main: bool) -> WandbTracker | None:
    """A W&B run on rank 0 (None on other ranks or with logging.wandb.mode=disabled)."""
    wb = cfg.logging.wandb
    if wb.mode == "disabled" or not is_main:
        return None
    # Set before wandb is imported: offline mode then makes no network lookups at all.
    os.environ["WANDB_MODE"] = wb.mode
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            f"logging.wandb.mode={wb.mode} needs wandb: pip install -e '.[logging]', or set logging.wandb.mode=disabled"
        ) from None
    root = Path(cfg.train.ckpt_dir)
    id_file = root / stage / RUN_ID_FILE
    resuming = cfg.train.resume != "never" and id_file.exists()
    run_id = id_file.read_text().strip() if resuming else uuid.uuid4().hex[:12]
    (root / "wandb").mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=wb.project,
        entity=wb.entity,
        name=wb.name or f"{root.name}-{stage}",
        tags=list(wb.tags),
        config=to_dict(cfg),
        dir=str(root),
        id=run_id,
        resume="allow",
        mode=wb.mode,
        job_type=stage,
    )
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    log.info("W&B %s run %s in %s", wb.mode, run_id, run.dir)
    return WandbTracker(run)
