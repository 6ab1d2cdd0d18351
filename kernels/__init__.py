"""scldm_kernels: Triton kernels for scLDM's hot spots (installed from the top-level kernels/ folder).

Each module holds a kernel, its launcher, an autograd.Function and the PyTorch reference. Nothing is
imported here: Triton chooses between its compiler and its interpreter when a module's kernels are
defined, so importing a kernel module must stay a deliberate act (after TRITON_INTERPRET is set, in tests).
"""
