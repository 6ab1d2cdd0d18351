"""How the modules count their own cost: forward FLOPs and saved activations, per cell.

FLOPs (PaLM appendix B, Kaplan et al. 2020): only matrix multiplications count, 2 FLOPs per multiply-add,
attention's score (Q Kᵀ) and value (P V) products included; elementwise work (LayerNorm, SiLU, softmax, the
NB log-likelihood) is left out. They are the model's FLOPs whichever kernel computes them (MFU measures the
model's work, not the implementation's).

Activations: the elements autograd saves for the backward pass, in the compute dtype unless named fp32, per
transformer block (all of it, and the part activation checkpointing keeps: the block's input) and outside the
blocks. Attention is assumed fused (no T x T score matrix saved).

train/flops.py and plan.py sum what the models report; they know nothing of the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def linear_flops(layer: nn.Linear, n_tokens: float) -> float:
    """2 T d_in d_out: the layer applied to T tokens (a bias is elementwise, not counted)."""
    return 2.0 * n_tokens * layer.in_features * layer.out_features


def attention_flops(n_queries: float, n_keys: float, width: int) -> float:
    """Scores Q Kᵀ and weighted sum P V over all heads of total width D (the head count cancels): 4 Q K D."""
    return 4.0 * n_queries * n_keys * width


@dataclass
class ActivationProfile:
    """Elements autograd saves per cell: per block (all of it, and its input), and outside the blocks."""

    block_full: list[int]
    block_input: list[int]
    outside: int
    outside_fp32: int

    @classmethod
    def from_blocks(cls, blocks: list[tuple[int, int]], outside: int, outside_fp32: int) -> ActivationProfile:
        """From (saved, input) per block, as the blocks' `activations` report them."""
        return cls([full for full, _ in blocks], [inp for _, inp in blocks], outside, outside_fp32)

    def bytes_per_cell(self, compute_bytes: int, checkpointing: bool) -> int:
        """Checkpointing keeps every block's input, plus one block's full activations while it is recomputed."""
        if checkpointing:
            recomputed = max(full - inp for full, inp in zip(self.block_full, self.block_input, strict=True))
            blocks = sum(self.block_input) + recomputed
        else:
            blocks = sum(self.block_full)
        return (blocks + self.outside) * compute_bytes + self.outside_fp32 * 4
