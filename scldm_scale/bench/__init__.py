"""Benchmarks behind `scldm-scale bench kernels|step|loader`, and the one place timing code lives.

- `kernels.py`: `bench kernels`, one table of the fused Triton kernels against their PyTorch alternatives
  (rooflines from `scldm_scale.hardware`); the per-op measurements are `mcab_attention.py` (MCAB pooling and
  unpooling vs every SDPA backend and FlexAttention, `attention_cost`) and `nb_loss.py` (fused vs eager NB
  loss). Their random inputs (`attention_inputs`, `nb_loss_inputs`) are also what `profile-kernels` traces.
- `step.py`: `bench step`, training throughput and memory per rank of each strategy at one global batch.
- `loader.py`: `bench loader`, our SOMA loader against tiledbsoma-ml on a synthetic atlas-like experiment.
- `timing.py`: `time_ms` (median of timed calls, CUDA events on a GPU) and `peak_memory_mib`, used by every
  kernel benchmark; `records.py`: the machine description and the JSON records every benchmark writes.

The kernel files (`scldm_kernels`) hold no timing code: kernels, launchers, autograd Functions and references.
Each benchmark prints a table and can write JSON records; none stands in for a test.
"""
