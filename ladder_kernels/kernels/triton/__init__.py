"""The Triton backend: one file per kernel family. Imported lazily (by ladder_kernels.backends): importing
triton needs a GPU driver or TRITON_INTERPRET=1 to launch anything."""

import importlib

# kernel name (ladder_kernels.backends) -> (module in this package, launcher)
KERNELS = {
    "nf4_matmul": ("nf4_matmul", "forward"),
    "nf4_matmul_grad_input": ("nf4_matmul", "grad_input"),
    "downproj": ("downproj", "forward"),
    "downproj_backward": ("downproj", "backward"),
    "cross_entropy_rows": ("cross_entropy", "ce_rows_"),
}


def load_kernel(name: str):
    module, launcher = KERNELS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), launcher)
