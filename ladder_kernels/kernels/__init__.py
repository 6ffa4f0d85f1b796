"""Kernel backends: Triton kernels (triton/) and the C++ CPU kernels (csrc/, loaded by ladder_kernels.backends)."""
