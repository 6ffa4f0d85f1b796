"""Frozen NF4 linear layers, in-place model quantization, and patching bitsandbytes layers to our kernels."""

from __future__ import annotations

import fnmatch
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from ladder_kernels.ops.nf4_matmul import PreparedNF4Matmul, nf4_matmul
from ladder_kernels.quant.nf4 import NF4Weight, quantize_nf4


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


# Storage dtypes FSDP2 can flatten and all-gather as they are (bitsandbytes' quant_storage choices).
SHARDABLE_STORAGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_storage_dtype(storage_dtype) -> None:
    names = ", ".join(str(d) for d in SHARDABLE_STORAGE_DTYPES)
    if not isinstance(storage_dtype, torch.dtype):
        raise TypeError(f"storage_dtype must be a torch.dtype (one of {names}), got {storage_dtype!r}")
    if not storage_dtype.is_floating_point:
        raise ValueError(
            f"storage_dtype must be a floating dtype (one of {names}) that FSDP can flatten, got {storage_dtype}; "
            "the NF4 bytes are uint8 already: leave them as buffers when not sharding them"
        )
    if storage_dtype not in SHARDABLE_STORAGE_DTYPES:
        raise ValueError(f"storage_dtype {storage_dtype} is not supported for the NF4 bytes; use one of {names}")


_WEIGHT_BUFFERS = ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset")
_CACHE_INPUTS = frozenset((*_WEIGHT_BUFFERS, "bias", "backend"))  # nf4_weight and matmul are built from these


class NF4Linear(nn.Module):
    """y = x @ dequant(W).T + b with W frozen in NF4 (held as buffers, not Parameters: it never trains).

    The 16-bit weight is never materialized: forward and backward run through `nf4_matmul`.
    compute_dtype: dtype the matmul runs in (None: the input's); the output comes back in the input's dtype.
    After `make_shardable_(storage_dtype)` (or `make_backbone_shardable_`) `packed` is instead a frozen Parameter
    holding the same bytes viewed as `storage_dtype` (1-D, zero-padded to whole elements), so FSDP2 shards it.
    """

    def __init__(
        self,
        weight: NF4Weight,
        bias: Optional[torch.Tensor] = None,
        compute_dtype: Optional[torch.dtype] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"NF4Linear: weight must be an NF4Weight, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype
        self.compute_dtype = compute_dtype
        self.backend = backend
        self.register_buffer("packed", weight.packed)
        self.packed_nbytes = weight.packed.numel()  # the true byte count (storage may pad it)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("code", weight.code)
        for name in ("nested_absmax", "nested_code", "offset"):
            self.register_buffer(name, getattr(weight, name))
        if bias is not None:
            bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.bias = bias

    @property
    def storage_dtype(self) -> Optional[torch.dtype]:
        """The dtype the NF4 bytes are stored as when shardable (a Parameter), else None (a uint8 buffer)."""
        return None if self.packed.dtype == torch.uint8 else self.packed.dtype

    @property
    def packed_bytes(self) -> torch.Tensor:
        """The NF4 bytes, uint8 [n, 1], whatever they are stored as (a view: no copy). Under FSDP2 this reads the
        full parameter it all-gathered before forward."""
        if self.storage_dtype is None:
            return self.packed
        return self.packed.view(torch.uint8).reshape(-1)[: self.packed_nbytes].reshape(-1, 1)

    @torch.no_grad()
    def make_shardable_(self, storage_dtype: torch.dtype = torch.bfloat16) -> "NF4Linear":
        """Store the NF4 bytes as a frozen nn.Parameter of `storage_dtype` (FSDP2 shards Parameters, not
        buffers, and flattens floating dtypes), as bitsandbytes' quant_storage does. The small quantization
        metadata (absmax, code, nested statistics) stay buffers. Returns self."""
        _check_storage_dtype(storage_dtype)
        data = self.packed_bytes.reshape(-1)
        # a fresh copy, zero-padded to whole elements (view(dtype) needs that, and an aligned start)
        data = torch.cat([data, data.new_zeros((-data.numel()) % storage_dtype.itemsize)])
        self._drop_caches()
        del self.packed  # drop the buffer (or a previous Parameter) so the name can be registered again
        self.packed = nn.Parameter(data.view(storage_dtype), requires_grad=False)
        return self

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() would convert the stored bytes as numbers and corrupt them: when a cast
        # changed their dtype, redo the move on the uint8 bytes (fn only moves non-floating tensors).
        self._drop_caches()  # they hold the tensors from before the move
        packed = self._parameters.get("packed")
        old = packed.detach() if packed is not None else None
        super()._apply(fn, recurse)
        if old is not None and self.packed.dtype != old.dtype:
            self.packed = nn.Parameter(fn(old.view(torch.uint8)).view(old.dtype), requires_grad=False)
        return self

    @property
    def nf4_weight(self) -> NF4Weight:
        """The weight as an NF4Weight over this layer's tensors. Built once (building and validating one cost more
        than a decode-sized matmul) and dropped when a tensor is replaced (__setattr__, _apply); rebuilt every call
        when the bytes are a shardable Parameter, which FSDP2 swaps."""
        if self.storage_dtype is not None:
            return self._build_nf4_weight()
        cached = self.__dict__.get("_nf4_weight_cache")
        if cached is None:
            cached = self.__dict__["_nf4_weight_cache"] = self._build_nf4_weight()
        return cached

    def __setattr__(self, name, value):
        if name in _CACHE_INPUTS:  # a replaced tensor or backend: what was built from the old one goes
            self._drop_caches()
        super().__setattr__(name, value)

    def _drop_caches(self) -> None:
        self.__dict__.pop("_nf4_weight_cache", None)
        self.__dict__.pop("_matmul_cache", None)

    @property
    def matmul(self) -> PreparedNF4Matmul:
        """nf4_matmul over this layer's weight, bias and backend, prepared once (and dropped with nf4_weight)."""
        cached = self.__dict__.get("_matmul_cache")
        if cached is None:
            cached = PreparedNF4Matmul(self.nf4_weight, self.bias, self.backend)
            if self.storage_dtype is None:
                self.__dict__["_matmul_cache"] = cached
        return cached

    def _build_nf4_weight(self) -> NF4Weight:
        return NF4Weight(
            packed=self.packed_bytes,
            absmax=self.absmax,
            blocksize=self.blocksize,
            shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype,
            code=self.code,
            nested_absmax=self.nested_absmax,
            nested_code=self.nested_code,
            offset=self.offset,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "NF4Linear":
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
            raise ValueError(
                "NF4Linear.from_bnb: layer.weight has no quant_state (move the layer to its device to quantize it "
                "first)"
            )
        q = NF4Weight.from_bnb(layer.weight.data, state)
        return cls(q, layer.bias, compute_dtype=getattr(layer, "compute_dtype", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        out = self.matmul(x)
        return out if out.dtype == in_dtype else out.to(in_dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.nested_absmax is not None else ""
        storage = f", storage_dtype={self.storage_dtype}" if self.storage_dtype is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}{dq}{storage}"
        )


def make_backbone_shardable_(model: nn.Module, storage_dtype: torch.dtype = torch.bfloat16) -> int:
    """Make every NF4Linear in `model` (a LadderModel or its backbone) shardable by FSDP2 (`fully_shard`): its
    NF4 bytes become a frozen Parameter of `storage_dtype`, its quantization metadata stay buffers. Opt-in, for
    backbones that do not fit one GPU; forward results are unchanged. Call it after quantizing (LadderModel
    quantizes its backbone when built). With an FSDP2 MixedPrecisionPolicy, use param_dtype=storage_dtype (as
    bitsandbytes asks of quant_storage): FSDP would otherwise cast the bytes as numbers. Returns how many
    layers were converted."""
    _check_storage_dtype(storage_dtype)
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    linear4bit = bnb_linear4bit_class()
    if not layers and linear4bit is not None and any(isinstance(m, linear4bit) for m in model.modules()):
        raise ValueError(
            "make_backbone_shardable_: the model holds bitsandbytes Linear4bit layers, not NF4Linear; "
            "load them with bnb_4bit_quant_storage instead, or convert them with quantize_model_"
        )
    for layer in layers:
        layer.make_shardable_(storage_dtype)
    return len(layers)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def quantize_model_(
    model: nn.Module,
    skip_modules: Iterable[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
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


def set_matmul_dtype_(model: nn.Module, dtype: Optional[torch.dtype]) -> int:
    """Make every NF4Linear in `model` multiply in `dtype` (None: its input's dtype), its output still in the
    input's: e.g. an fp32 backbone whose 4-bit matmuls run in bf16 on a CPU with native bf16, where the rest (norms,
    attention, residual stream) stays fp32. Returns how many layers it set."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    for layer in layers:
        layer.compute_dtype = dtype
    return len(layers)


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
