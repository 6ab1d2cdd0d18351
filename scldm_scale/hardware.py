"""Peak throughput of known GPUs, by their CUDA name: the one table MFU (train/) and rooflines (bench/) read.

Each row: a pattern matched against torch.cuda.get_device_name(), the peak dense (no 2:4 sparsity) bf16
tensor-core TFLOP/s with fp32 accumulation (as PyTorch's bf16 matmuls run), and the peak DRAM bandwidth in
TB/s (10^12 bytes/s; None where not listed). Rows are tried in order, so specific names come first ("H100 NVL"
before "H100", "A100 80GB PCIe" before "A100", "A10G" before "A10", "L40S" before "L40" before "L4").

Sources: NVIDIA datasheets (B200, H100 SXM5/PCIe/NVL, H200 SXM/NVL, H800, H20, A100 40GB/80GB SXM4/PCIe, L4,
L40S, L40, A10, A40, A30, V100 SXM2/PCIe, V100S, T4), the Ada and Ampere GA102 architecture whitepapers
(GeForce: the fp32-accumulate rate, half the fp16-accumulate one), Baseten's A10 vs A10G comparison (A10G: 70
TFLOP/s; AWS G5 for its bandwidth), the V100 datasheet (no bf16: its fp16 tensor rate), the B200 product page
(HGX B200 per GPU: 4.5 PFLOP/s sparse).
"""

from __future__ import annotations

import re

# (name pattern, bf16 TFLOP/s, TB/s)
PEAKS: tuple[tuple[str, float, float | None], ...] = (
    (r"\bB200\b", 2250.0, 8.0),
    (r"\bH100\b.*\bNVL\b", 835.0, 3.9),
    (r"\bH100\b.*\bPCIE\b", 756.0, 2.0),
    (r"\bH100\b", 989.0, 3.35),  # SXM5 (reported as e.g. "NVIDIA H100 80GB HBM3")
    (r"\bH200\b.*\bNVL\b", 835.0, 4.8),
    (r"\bH200\b", 989.0, 4.8),  # SXM
    (r"\bGH200\b", 989.0, None),
    (r"\bH800\b", 989.0, 3.35),
    (r"\bH20\b", 148.0, 4.0),
    (r"\bA100\b.*\b80\s*GB\b.*\bPCIE\b", 312.0, 1.935),
    (r"\bA100\b.*\b80\s*GB\b", 312.0, 2.039),  # "NVIDIA A100-SXM4-80GB"
    (r"\bA100\b", 312.0, 1.555),  # 40 GB, SXM4 and PCIe
    (r"\bA800\b", 312.0, None),
    (r"\bA10G\b", 70.0, 0.6),
    (r"\bA10\b", 125.0, 0.6),
    (r"\bA30\b", 165.0, 0.933),
    (r"\bA40\b", 149.7, 0.696),
    (r"\bL40S\b", 362.0, 0.864),
    (r"\bL40\b", 181.0, 0.864),
    (r"\bL4\b", 121.0, 0.3),
    (r"\bRTX 6000 ADA\b", 364.2, None),
    (r"\bRTX A6000\b", 154.8, None),
    (r"\bRTX 4090\b", 165.2, None),
    (r"\bRTX 3090\b", 71.0, None),
    (r"\bV100S\b", 130.0, 1.134),
    (r"\bV100\b.*\bPCIE\b", 112.0, 0.9),
    (r"\bV100\b", 125.0, 0.9),  # SXM2
    (r"\bT4\b", 65.0, 0.32),
)


def _peaks(device_name: str) -> tuple[float, float | None] | None:
    for pattern, tflops, tbs in PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops, tbs
    return None


def lookup_peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU by its CUDA name, None when it is not in the table."""
    peaks = _peaks(device_name)
    return None if peaks is None else peaks[0]


def lookup_peak_memory_tbs(device_name: str) -> float | None:
    """Peak DRAM bandwidth in TB/s of a GPU by its CUDA name, None when it is not in the table."""
    peaks = _peaks(device_name)
    return None if peaks is None else peaks[1]
