"""ladder-kernels: Ladder Side Tuning and xLadder on a frozen 4-bit (NF4) backbone."""
from ._backend import backend_info
from .ops import nf4_matmul
from .quant import NF4Weight, dequantize_nf4, quantize_nf4

__version__ = "0.1.0"
__all__ = ["backend_info", "nf4_matmul", "NF4Weight", "quantize_nf4", "dequantize_nf4", "__version__"]
