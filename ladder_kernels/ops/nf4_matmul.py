"""`nf4_matmul(x, q, bias)` = x @ dequant(W).T + bias, with W a frozen NF4 weight [N, K].

One torch.library op pair, `ladder::nf4_matmul` (forward) and `ladder::nf4_matmul_grad_input`
(grad_x = grad_out @ W, reading the packed weight in transposed order), each with a fake implementation
so FakeTensorMode / torch.compile see through them. The weight is frozen: no gradient for it.

Backends (chosen per call by `ladder_kernels.backends.resolve_backend`):
  triton  ladder_kernels.kernels.triton.nf4_matmul   (CUDA; CPU under TRITON_INTERPRET=1)
  cpu     torch.ops.ladder_cpu.*              (csrc/nf4_matmul.cpp)
  torch   the reference below: dequantize whole, then matmul
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ladder_kernels.backends import is_plain_call, kernel, register_reference, resolve_backend
from ladder_kernels.quant.nf4 import NF4Weight, dequantize_packed


# --- reference (the oracle the other backends are tested against) -------------------------------------
# absmax is fp32 [n_blocks] (nested_absmax, nested_code, offset None), or the double-quantized form as stored:
# uint8 codes [n_blocks], fp32 nested_absmax [ceil(n_blocks / 256)], fp32 nested_code [256], offset [1]. Every
# backend decodes the nested form itself: nothing of size n_blocks is materialized per call.
@register_reference("nf4_matmul")
def reference_forward(
    x2d: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    n: int,
    k: int,
    blocksize: int,
    bias: Optional[Tensor],
) -> Tensor:
    w = dequantize_packed(packed, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, x2d.dtype)
    out = x2d @ w.t()
    return out + bias.to(out.dtype) if bias is not None else out


@register_reference("nf4_matmul_grad_input")
def reference_grad_input(
    g2d: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    n: int,
    k: int,
    blocksize: int,
) -> Tensor:
    return g2d @ dequantize_packed(packed, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, g2d.dtype)


# --- the ops -------------------------------------------------------------------------------------------
@torch.library.custom_op("ladder::nf4_matmul", mutates_args=())
def _nf4_matmul_op(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    bias: Optional[Tensor],
    backend: str,
) -> Tensor:
    return _forward(
        x, packed, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize, bias, backend
    )


def _forward(
    x, packed, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize, bias, backend
):
    x2d = x.reshape(-1, in_features)
    stats = (absmax, code, nested_absmax, nested_code, offset)
    out = kernel("nf4_matmul", backend)(x2d, packed, *stats, out_features, in_features, blocksize, bias)
    return out.reshape(*x.shape[:-1], out_features)


@_nf4_matmul_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize, bias, backend):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("ladder::nf4_matmul_grad_input", mutates_args=())
def _nf4_matmul_grad_input_op(
    grad_out: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    offset: Optional[Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    backend: str,
) -> Tensor:
    g2d = grad_out.reshape(-1, out_features)
    stats = (absmax, code, nested_absmax, nested_code, offset)
    gx = kernel("nf4_matmul_grad_input", backend)(g2d, packed, *stats, out_features, in_features, blocksize)
    return gx.reshape(*grad_out.shape[:-1], in_features)


@_nf4_matmul_grad_input_op.register_fake
def _(
    grad_out, packed, absmax, code, nested_absmax, nested_code, offset, out_features, in_features, blocksize, backend
):
    return grad_out.new_empty(*grad_out.shape[:-1], in_features)


def _setup_context(ctx, inputs, output):
    x, packed, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, bias, backend = inputs
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset)
    ctx.meta = (n, k, blocksize, backend)
    ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[10]


def _backward(ctx, grad_out):
    n, k, blocksize, backend = ctx.meta
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _nf4_matmul_grad_input_op(grad_out.contiguous(), *ctx.saved_tensors, n, k, blocksize, backend)
    grad_bias = grad_out.reshape(-1, n).sum(0) if ctx.bias_needs_grad else None
    return grad_x, None, None, None, None, None, None, None, None, None, grad_bias, None


_nf4_matmul_op.register_autograd(_backward, setup_context=_setup_context)


# --- public entry point --------------------------------------------------------------------------------
def check_nf4_matmul_args(x: Tensor, q: NF4Weight, bias: Optional[Tensor]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"nf4_matmul: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(q, NF4Weight):
        raise TypeError(f"nf4_matmul: q must be an NF4Weight, got {type(q).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"nf4_matmul: x must be float32, bfloat16 or float16, got {x.dtype}")
    n, k = q.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(
            f"nf4_matmul: x's last dim must equal the weight's in_features {k}, got x of shape {tuple(x.shape)}"
        )
    if x.device != q.device:
        raise ValueError(f"nf4_matmul: x is on {x.device} but the weight q is on {q.device}")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(
            f"nf4_matmul: bias must have shape ({n},) on {x.device}, got {tuple(bias.shape)} on {bias.device}"
        )


def nf4_matmul(
    x: Tensor,
    q: NF4Weight,
    bias: Optional[Tensor] = None,
    backend: Optional[str] = None,
    absmax: Optional[Tensor] = None,
) -> Tensor:
    """x [..., K] @ dequant(q).T [K, N] (+ bias) -> [..., N] in x's dtype; differentiable in x and bias.

    backend: None (by device), "triton", "cpu" or "torch". absmax: an fp32 per-block absmax to use instead of
    q's own statistics (e.g. q.block_absmax() cached by the caller); by default a double-quantized q is read in
    its nested form, decoded inside the kernel.
    """
    check_nf4_matmul_args(x, q, bias)
    backend = resolve_backend(x.device, backend, "nf4_matmul", "nf4_matmul")
    n, k = q.shape
    if absmax is not None and (absmax.dtype != torch.float32 or absmax.numel() != q.n_blocks):
        raise ValueError(
            f"nf4_matmul: absmax must be float32 with {q.n_blocks} entries (one per block), got {absmax.dtype} "
            f"with {absmax.numel()}"
        )
    absmax, nested_absmax, nested_code, offset = q.absmax_args() if absmax is None else (absmax, None, None, None)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    stats = (absmax, q.code, nested_absmax, nested_code, offset)
    op = _forward if is_plain_call(x, bias) else _nf4_matmul_op
    return op(x, q.packed, *stats, n, k, q.blocksize, bias, backend)


class PreparedNF4Matmul:
    """`nf4_matmul(x, q, bias, backend)` with q, bias and backend fixed, for a layer that calls it over and over:
    q's kernel arguments are gathered once, and a call that needs no autograd, tracing or cast goes straight to
    the kernel. Generating with SmolLM2 makes 210 such calls a token; the checks and argument gathering of each
    cost about as much as the kernel itself at its 576-wide matrices. Any other call takes nf4_matmul, checks
    and all."""

    def __init__(self, q: NF4Weight, bias: Optional[Tensor] = None, backend: Optional[str] = None):
        if not isinstance(q, NF4Weight):
            raise TypeError(f"PreparedNF4Matmul: q must be an NF4Weight, got {type(q).__name__}")
        n, k = q.shape
        if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (n,) or bias.device != q.device):
            got = f"shape {tuple(bias.shape)} on {bias.device}" if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"PreparedNF4Matmul: bias must be a tensor of shape ({n},) on {q.device}, got {got}")
        self.q, self.bias, self.backend = q, bias, backend
        absmax, nested_absmax, nested_code, offset = q.absmax_args()
        self._args = (q.packed, absmax, q.code, nested_absmax, nested_code, offset, n, k, q.blocksize)

    def __call__(self, x: Tensor) -> Tensor:
        bias = self.bias
        check_nf4_matmul_args(x, self.q, bias)
        if (bias is not None and bias.dtype != x.dtype) or not is_plain_call(x, bias):
            return nf4_matmul(x, self.q, bias, self.backend)  # casts the bias, or goes through the custom op
        backend = resolve_backend(x.device, self.backend, "nf4_matmul", "nf4_matmul")
        return _forward(x, *self._args, bias, backend)
