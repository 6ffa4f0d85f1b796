"""ladder-kernels: Ladder Side Tuning and xLadder on a frozen 4-bit (NF4) backbone."""

# first, before any module imports torch: the `ladder-kernels` command's OMP_WAIT_POLICY default (no-op for a library)
from ladder_kernels import _launch  # noqa: F401
from ladder_kernels._version import __version__
from ladder_kernels.backends import backend_info
from ladder_kernels.nn import LadderConfig, LadderModel, NF4Linear, get_ladder_model, patch_bnb_, quantize_model_
from ladder_kernels.ops import nf4_matmul
from ladder_kernels.ops.cross_entropy import fused_linear_cross_entropy
from ladder_kernels.ops.downproj import downproj
from ladder_kernels.planning.planner import MemoryPlan, plan
from ladder_kernels.quant import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = [
    "backend_info",
    "nf4_matmul",
    "downproj",
    "fused_linear_cross_entropy",
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "NF4Linear",
    "quantize_model_",
    "patch_bnb_",
    "LadderConfig",
    "LadderModel",
    "get_ladder_model",
    "plan",
    "MemoryPlan",
    "__version__",
]
