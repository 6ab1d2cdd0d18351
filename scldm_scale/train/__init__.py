"""The training engine: one loop, its optimiser/schedule/EMA, checkpoints and metrics."""
