"""Kernel tests run Triton's interpreter on the CPU: TRITON_INTERPRET=1 must be set before any kernel module
is imported, because Triton picks compiler or interpreter when each kernel is defined.

Set TRITON_INTERPRET=0 in the environment on a GPU machine to test the compiled kernels on CUDA instead.
"""

import importlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

# A module imported earlier in the session (by a model test, say) was defined under the other mode:
# reload it, _triton first, so that its INTERPRETING constant and its kernels agree with the variable.
for _name in sorted(n for n in sys.modules if n.startswith("scldm_kernels.")):
    importlib.reload(sys.modules[_name])
