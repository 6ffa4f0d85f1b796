"""NF4 format: quantize / dequantize / bitsandbytes interop."""

from ladder_kernels.quant.nf4 import NF4_CODE, NF4Weight, dequantize_nf4, nf4_code, quantize_nf4

__all__ = ["NF4Weight", "quantize_nf4", "dequantize_nf4", "nf4_code", "NF4_CODE"]
