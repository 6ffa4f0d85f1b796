"""What every backend of an op agrees on, in one place: the reference (ladder_kernels/ops/), the fake
implementations and the Triton launchers import these; the C++ kernels (csrc/) cannot, so tests check them
against these (tests/kernels/test_contracts.py).

downproj keeps its input h [m, D] for the weight gradient as
  storage "int8":  per-row int8 codes [m, D] and fp32 scales [m]
  storage "bf16":  nothing new if h is already 16-bit (h itself is kept), else a bf16 copy [m, D]
  storage "none":  nothing (no gradient needs h)
"""

from __future__ import annotations

import torch

# int8 rows whose absmax is below this are stored as zeros (scale 0): 127 / absmax would overflow fp32.
ROW_ABSMAX_FLOOR = 1e-30
DOWNPROJ_OP_STORAGES = ("bf16", "int8", "none")  # "none": the op's internal storage when no gradient needs h


def saves_input_itself(h_dtype: torch.dtype, storage: str) -> bool:
    """bf16 storage of an already 16-bit h keeps h itself (same bytes as a copy would take)."""
    return storage == "bf16" and h_dtype in (torch.bfloat16, torch.float16)


def downproj_saved_layout(h_dtype: torch.dtype, storage: str, rows: int, cols: int) -> tuple[tuple, torch.dtype, int]:
    """(shape, dtype) of the h_saved tensor that ladder::downproj returns, and the length of h_scale."""
    if storage == "int8":
        return (rows, cols), torch.int8, rows
    if storage == "none" or saves_input_itself(h_dtype, storage):
        return (0,), h_dtype, 0
    return (rows, cols), torch.bfloat16, 0


def empty_downproj_saved(h: torch.Tensor, storage: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (h_saved, h_scale) tensors of the layout above, on h's device (fakes under FakeTensorMode)."""
    shape, dtype, scale_len = downproj_saved_layout(h.dtype, storage, rows, cols)
    return h.new_empty(shape, dtype=dtype), h.new_empty(scale_len, dtype=torch.float32)
