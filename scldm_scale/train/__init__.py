"""The training engine: one loop over a strategy, its optimiser/schedule/EMA, checkpoints and metrics.

- `trainer.py`: `Trainer.fit(batches, on_step=None)`, the one loop of both stages: micro-batches under
  autocast, then the strategy's step; logs loss, lr, grad norm, cells/s, tokens/s, the data-wait fraction,
  MFU and peak memory (progress bar, JSONL, W&B); `on_step(step, record)` after each optimizer step.
- `strategies.py`: how the model is spread over processes (single, ddp, fsdp, deepspeed), behind one
  interface the trainer uses without asking which strategy it has: `zero_grad`, `no_sync`, `backward`,
  `step`, `check_resumable` / `save` / `load`, `full_state_dict`.
- `optim.py` (AdamW, wsd/cosine schedules, EMA), `checkpoint.py` (resumable `step-N/` folders),
  `distributed.py` (the process group), `flops.py` (MFU from the models' own FLOP counts),
  `tracking.py` (W&B).
- `stages.py`: the VAE and LDM stages as functions of a Config, each ending in a model artifact;
  `finetune.py`: `train.init_from`, a VAE's weights onto another gene vocabulary;
  `export.py`: a step folder (or a 0.1 `.pt`) -> an artifact.
"""
