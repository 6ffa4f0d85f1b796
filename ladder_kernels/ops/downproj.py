"""`downproj(h, weight, bias, storage)` = h @ weight.T + bias: the ladder down-projection.

h [..., D] comes from the frozen backbone (normally no grad); weight [d, D] and bias [d] are trainable
(possibly fp32 master weights while h is bf16). The forward computes in h's dtype; gradients come back in
the parameters' dtypes. For dW = g^T @ h the op keeps h in the configured storage:
  "bf16"  h itself if it is already 16-bit (bf16/fp16: no copy), else a bf16 copy written by the forward;
  "int8"  per-row symmetric absmax int8 + one fp32 scale per row, quantized in the same kernel as the
          matmul; the backward reads the int8 rows directly and dequantizes tile by tile.

Ops: `ladder::downproj` -> (z, h_saved, h_scale) and `ladder::downproj_backward` -> (grad_weight,
grad_bias), each with a fake implementation. grad_h = g @ W (only when h requires grad) is a plain matmul.
When no gradient needs h (no_grad, or weight and bias frozen) the public entry passes the op's internal
storage "none": nothing is kept or quantized.

int8 rounding, identical on every backend: inv = 127 / absmax (0 for a row with absmax < 1e-30),
q = round-half-away-from-zero(h * inv) clamped to [-127, 127], scale = absmax / 127.

Backends (chosen per call by `ladder_kernels.backends.resolve_backend`):
  triton  ladder_kernels.kernels.triton.downproj   (CUDA; CPU under TRITON_INTERPRET=1)
  cpu     torch.ops.ladder_cpu.downproj / downproj_backward   (csrc/downproj.cpp)
  torch   the reference below
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ladder_kernels.backends import is_plain_call, kernel, register_reference, resolve_backend
from ladder_kernels.defaults import LADDER_STORAGES
from ladder_kernels.kernels.contracts import (
    ROW_ABSMAX_FLOOR,
    downproj_saved_layout,
    empty_downproj_saved,
    saves_input_itself,
)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- reference (the oracle the other backends are tested against) -------------------------------------
def quantize_rows_int8(h2d: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric absmax int8: (q int8 [M, D], scale fp32 [M]) with h ≈ q * scale[:, None]."""
    hf = h2d.float()
    absmax = hf.abs().amax(dim=1) if hf.shape[1] > 0 else hf.new_zeros(hf.shape[0])
    nonzero = absmax >= ROW_ABSMAX_FLOOR
    inv = torch.where(nonzero, 127.0 / absmax.clamp_min(ROW_ABSMAX_FLOOR), 0.0)
    x = hf * inv[:, None]
    q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).clamp_(-127, 127).to(torch.int8)
    return q, torch.where(nonzero, absmax / 127.0, 0.0)


def dequantize_rows_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale[:, None]


@register_reference("downproj")
def reference_forward(
    h2d: Tensor, weight: Tensor, bias: Optional[Tensor], storage: str
) -> tuple[Tensor, Tensor, Tensor]:
    z = h2d @ weight.to(h2d.dtype).t()
    if bias is not None:
        z = z + bias.to(z.dtype)
    if storage == "int8":
        q, scale = quantize_rows_int8(h2d)
        return z, q, scale
    shape, dtype, _ = downproj_saved_layout(h2d.dtype, storage, *h2d.shape)
    saved = h2d.to(dtype) if shape != (0,) else h2d.new_empty(shape)  # a bf16 copy, or nothing kept
    return z, saved, h2d.new_empty(0, dtype=torch.float32)


@register_reference("downproj_backward")
def reference_backward(
    g2d: Tensor, h_saved: Tensor, h_scale: Tensor, weight_dtype: torch.dtype, bias_dtype: Optional[torch.dtype]
) -> tuple[Tensor, Tensor]:
    h = dequantize_rows_int8(h_saved, h_scale) if h_saved.dtype == torch.int8 else h_saved.float()
    g = g2d.float()
    grad_w = (g.t() @ h).to(weight_dtype)
    grad_b = g.sum(0).to(bias_dtype) if bias_dtype is not None else g.new_empty(0)
    return grad_w, grad_b


# --- the ops -------------------------------------------------------------------------------------------
@torch.library.custom_op("ladder::downproj", mutates_args=())
def _downproj_op(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], storage: str, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(h, weight, bias, storage, backend)


def _forward(h, weight, bias, storage, backend):
    d, D = weight.shape
    z, h_saved, h_scale = kernel("downproj", backend)(h.reshape(-1, D), weight, bias, storage)
    return z.reshape(*h.shape[:-1], d), h_saved, h_scale


@_downproj_op.register_fake
def _(h, weight, bias, storage, backend):
    d, D = weight.shape
    m = h.numel() // D if D else 0
    return (h.new_empty(*h.shape[:-1], d), *empty_downproj_saved(h, storage, m, D))


@torch.library.custom_op("ladder::downproj_backward", mutates_args=())
def _downproj_backward_op(
    grad_z: Tensor,
    h_saved: Tensor,
    h_scale: Tensor,
    weight_dtype: torch.dtype,
    bias_dtype: Optional[torch.dtype],
    backend: str,
) -> tuple[Tensor, Tensor]:
    return kernel("downproj_backward", backend)(grad_z, h_saved, h_scale, weight_dtype, bias_dtype)


@_downproj_backward_op.register_fake
def _(grad_z, h_saved, h_scale, weight_dtype, bias_dtype, backend):
    d, D = grad_z.shape[1], h_saved.shape[1]
    grad_b = (
        grad_z.new_empty(d, dtype=bias_dtype) if bias_dtype is not None else grad_z.new_empty(0, dtype=torch.float32)
    )
    return grad_z.new_empty(d, D, dtype=weight_dtype), grad_b


def _setup_context(ctx, inputs, output):
    h, weight, bias, storage, backend = inputs
    _, h_saved, h_scale = output
    ctx.mark_non_differentiable(h_saved, h_scale)
    if saves_input_itself(h.dtype, storage):
        h_saved = h.reshape(-1, weight.shape[1])
    # weight is needed only for grad_h (h requiring grad is the unusual case).
    ctx.save_for_backward(h_saved, h_scale, weight if ctx.needs_input_grad[0] else None)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.weight_dtype = weight.dtype
    ctx.h_shape = h.shape
    ctx.storage = storage
    ctx.backend = backend


def _backward(ctx, grad_z, _grad_h_saved, _grad_h_scale):
    h_saved, h_scale, weight = ctx.saved_tensors
    d = grad_z.shape[-1]
    g2d = grad_z.reshape(-1, d).contiguous()
    grad_h = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_h = (g2d @ weight.to(g2d.dtype)).reshape(ctx.h_shape)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        if ctx.storage == "none":
            raise RuntimeError("ladder::downproj was called with storage='none', so it kept no h for dW")
        grad_w, grad_b = _downproj_backward_op(g2d, h_saved, h_scale, ctx.weight_dtype, ctx.bias_dtype, ctx.backend)
        if not ctx.needs_input_grad[2]:
            grad_b = None
    return grad_h, grad_w, grad_b, None, None


_downproj_op.register_autograd(_backward, setup_context=_setup_context)


# --- public entry point --------------------------------------------------------------------------------
def check_downproj_args(h: Tensor, weight: Tensor, bias: Optional[Tensor], storage: str) -> None:
    for name, t in (("h", h), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"downproj: {name} must be a torch.Tensor, got {type(t).__name__}")
    if storage not in LADDER_STORAGES:
        raise ValueError(f"downproj: storage must be one of {LADDER_STORAGES}, got {storage!r}")
    if h.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"downproj: h must be float32, bfloat16 or float16, got {h.dtype}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"downproj: weight must be float32, bfloat16 or float16, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"downproj: weight must be 2-D [d, D], got shape {tuple(weight.shape)}")
    if h.dim() == 0 or h.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"downproj: h's last dim must equal weight's D = {weight.shape[1]}, got h of shape {tuple(h.shape)}"
        )
    if weight.device != h.device:
        raise ValueError(f"downproj: weight is on {weight.device} but h is on {h.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"downproj: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"downproj: bias must be float32, bfloat16 or float16, got {bias.dtype}")
        if bias.shape != (weight.shape[0],) or bias.device != h.device:
            raise ValueError(
                f"downproj: bias must have shape ({weight.shape[0]},) on {h.device}, got {tuple(bias.shape)} on "
                f"{bias.device}"
            )


def downproj(
    h: Tensor, weight: Tensor, bias: Optional[Tensor] = None, storage: str = "bf16", backend: Optional[str] = None
) -> Tensor:
    """z = h @ weight.T + bias, [..., D] -> [..., d] in h's dtype; keeps h for dW in `storage` ("bf16"/"int8").

    Differentiable in weight and bias (gradients in their dtypes), and in h if h requires grad.
    backend: None (by device), "triton", "cpu" or "torch".
    """
    check_downproj_args(h, weight, bias, storage)
    backend = resolve_backend(h.device, backend, "downproj", "downproj")
    params_need_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    op_storage = storage if torch.is_grad_enabled() and params_need_grad else "none"
    op = _forward if is_plain_call(h, weight, bias) else _downproj_op  # generation: one call per side layer
    z, _, _ = op(h, weight, bias, op_storage, backend)
    return z
