"""Frozen NF4 linear layers, in-place model quantization, and patching bitsandbytes layers to our kernels."""
from __future__ import annotations

import fnmatch
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from ..ops.nf4_matmul import nf4_matmul
from ..quant.nf4 import NF4Weight, quantize_nf4


def bnb_linear4bit_class():
    """bitsandbytes' Linear4bit class, or None where bitsandbytes is not installed."""
    try:
        import bitsandbytes as bnb
    except Exception:  # bitsandbytes is optional for everything but interop
        return None
    return bnb.nn.Linear4bit


def _bnb_standard_layout_(layer) -> None:
    """bitsandbytes repacks a Linear4bit's bytes into a CPU-specific tile order (absmax dequantized to bf16)
    on its first no-grad CPU forward; undo that in place, as bitsandbytes itself does before saving."""
    state = getattr(layer.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)


class NF4Linear(nn.Module):
    """y = x @ dequant(W).T + b with W frozen in NF4 (held as buffers, not Parameters: it never trains).

    The 16-bit weight is never materialized: forward and backward run through `nf4_matmul`.
    compute_dtype: dtype the matmul runs in (None: the input's); the output comes back in the input's dtype.
    """

    def __init__(self, weight: NF4Weight, bias: Optional[torch.Tensor] = None, compute_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"NF4Linear: weight must be an NF4Weight, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype
        self.compute_dtype = compute_dtype
        self.backend = backend
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("code", weight.code)
        for name in ("nested_absmax", "nested_code", "offset"):
            self.register_buffer(name, getattr(weight, name))
        if bias is not None:
            bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.bias = bias

    @property
    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(
            packed=self.packed, absmax=self.absmax, blocksize=self.blocksize, shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype, code=self.code, nested_absmax=self.nested_absmax, nested_code=self.nested_code, offset=self.offset,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None) -> "NF4Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        q = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias, compute_dtype=compute_dtype or linear.weight.dtype)

    @classmethod
    def from_bnb(cls, layer) -> "NF4Linear":
        """From a bitsandbytes Linear4bit (nf4, already quantized): shares its bytes, no copy."""
        _bnb_standard_layout_(layer)
        state = getattr(layer.weight, "quant_state", None)
        if state is None:
            raise ValueError("NF4Linear.from_bnb: layer.weight has no quant_state (move the layer to its device to quantize it first)")
        q = NF4Weight.from_bnb(layer.weight.data, state)
        return cls(q, layer.bias, compute_dtype=getattr(layer, "compute_dtype", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        return nf4_matmul(x, self.nf4_weight, self.bias, backend=self.backend).to(in_dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.nested_absmax is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, blocksize={self.blocksize}{dq}"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def quantize_model_(model: nn.Module, skip_modules: Iterable[str] = ("lm_head",), blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace, in place, every nn.Linear and bitsandbytes nf4 Linear4bit (except `skip_modules`, matched by
    name or leaf name, glob patterns allowed) by an NF4Linear. Returns the model."""
    skip_modules = tuple(skip_modules)
    linear4bit = bnb_linear4bit_class()
    replacements = []
    for name, module in model.named_modules():
        if not name or _matches(name, skip_modules):
            continue
        if linear4bit is not None and isinstance(module, linear4bit):
            replacements.append((name, NF4Linear.from_bnb(module)))
        elif type(module) is nn.Linear:
            replacements.append((name, NF4Linear.from_linear(module, blocksize, double_quant, compute_dtype)))
    for name, new in replacements:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    return model


def _patched_linear4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes Linear4bit.forward, with bnb.matmul_4bit replaced by nf4_matmul (same dtype rules)."""
    _bnb_standard_layout_(self)
    state = self.weight.quant_state
    compute_dtype = getattr(self, "compute_dtype", None) or x.dtype
    bias = None if self.bias is None else self.bias.to(compute_dtype)
    q = NF4Weight.from_bnb(self.weight.data, state)
    return nf4_matmul(x.to(compute_dtype), q, bias).to(x.dtype)


def patch_bnb_(model: nn.Module) -> int:
    """Make a model's bitsandbytes nf4 Linear4bit layers (e.g. inside a peft QLoRA model) compute through
    `nf4_matmul`; nothing else changes (parameters, state dict, LoRA adapters). Returns how many were patched."""
    linear4bit = bnb_linear4bit_class()
    if linear4bit is None:
        raise RuntimeError("patch_bnb_: bitsandbytes is not installed")
    patched = 0
    for name, module in model.named_modules():
        if not isinstance(module, linear4bit):
            continue
        _bnb_standard_layout_(module)
        state = getattr(module.weight, "quant_state", None)
        if state is None or state.quant_type != "nf4":
            warnings.warn(f"patch_bnb_: {name} is not an nf4-quantized layer; left unpatched", stacklevel=2)
            continue
        module.forward = _patched_linear4bit_forward.__get__(module)
        patched += 1
    return patched
