"""ladder-kernels: Ladder Side Tuning and xLadder on a frozen 4-bit (NF4) backbone."""
from ._backend import backend_info
from .nn import LadderConfig, LadderModel, NF4Linear, get_ladder_model, patch_bnb_, quantize_model_
from .ops import nf4_matmul
from .ops.cross_entropy import fused_linear_cross_entropy
from .ops.downproj import downproj
from .plan import MemoryPlan, plan
from .quant import NF4Weight, dequantize_nf4, quantize_nf4

from ._version import __version__
__all__ = [
    "backend_info", "nf4_matmul", "downproj", "fused_linear_cross_entropy", "NF4Weight", "quantize_nf4",
    "dequantize_nf4", "NF4Linear", "quantize_model_", "patch_bnb_", "LadderConfig", "LadderModel",
    "get_ladder_model", "plan", "MemoryPlan", "__version__",
]

