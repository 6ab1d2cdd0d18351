"""Kernel tests run Triton's interpreter on the CPU: TRITON_INTERPRET=1 must be set before Triton itself is
imported, because each `@triton.jit` (Triton's own standard library included) picks compiler or
interpreter when it is defined.

Set TRITON_INTERPRET=0 in the environment on a GPU machine to test the compiled kernels on CUDA instead.
"""

import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        raise RuntimeError(
            "tests/kernels: Triton was imported (by an earlier test module or plugin) before this conftest could "
            "set TRITON_INTERPRET=1, so its kernels would compile for a GPU. Run with TRITON_INTERPRET=1 in the "
            "environment, or set it in tests/conftest.py."
        )
    os.environ["TRITON_INTERPRET"] = "1"
