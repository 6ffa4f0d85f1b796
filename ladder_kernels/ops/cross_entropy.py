"""`fused_linear_cross_entropy(hidden, weight, labels)`: CE of hidden @ weight.T through a FROZEN lm_head,
without ever holding the [T, V] logits (Liger-Kernel's FusedLinearCrossEntropy design).

Tokens go `chunk_size` at a time through one reused [chunk, V] buffer: logits = hidden_chunk @ W.T (+ bias);
a row-wise kernel then computes each row's logsumexp and loss and, when a gradient is needed, overwrites the
buffer with d(loss_row)/d(logits) = softmax - onehot (times the softcap's tanh' if any); grad_hidden_chunk =
grad_logits @ W. So the gradient w.r.t. hidden is computed in the forward, stored ([T, D], small), and the
backward only scales it by grad_output. Under torch.no_grad (or when hidden does not require grad) the
gradient work is skipped.

Op: `ladder::fused_linear_cross_entropy` -> (losses [T] fp32, grad_hidden [T, D] or [0, D]); the reduction
("mean" over non-ignored labels, "sum", "none") is plain torch on top, so autograd scales grad_hidden.
The matmuls run in the weight's dtype (a [chunk, D] slice of hidden is cast, never the [V, D] weight); the
row-wise kernels do fp32 math. weight and bias get no gradient: passing ones that require grad while grad
is enabled raises ValueError (freeze them, e.g. `lm_head.weight.requires_grad_(False)`).

Row-wise CE kernel `cross_entropy_rows`, backends (chosen per call by `ladder_kernels.backends.resolve_backend`):
  triton  ladder_kernels.kernels.triton.cross_entropy  (online softmax over V blocks; CUDA, or TRITON_INTERPRET=1)
  cpu     torch.ops.ladder_cpu.cross_entropy_rows_   (csrc/cross_entropy.cpp, parallel over rows)
  torch   the reference below
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ladder_kernels.backends import kernel, register_reference, resolve_backend

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# --- reference row-wise kernel (the oracle the other backends are tested against) ----------------------
@register_reference("cross_entropy_rows")
def reference_ce_rows_(logits: Tensor, labels: Tensor, ignore_index: int, softcap: float, compute_grad: bool) -> Tensor:
    """Per-row CE loss (fp32, 0 on ignored rows) of logits [n, V]; if compute_grad, logits := d loss_row / d logits.

    softcap > 0 applies softcap * tanh(logits / softcap) first; 0 means no softcap.
    """
    z = logits.float()
    capped = softcap * torch.tanh(z / softcap) if softcap > 0 else z
    lse = torch.logsumexp(capped, dim=1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    loss = torch.where(valid, lse - capped.gather(1, safe[:, None]).squeeze(1), torch.zeros_like(lse))
    if compute_grad:
        grad = torch.exp(capped - lse[:, None])
        grad.scatter_add_(1, safe[:, None], -torch.ones_like(lse[:, None]))
        if softcap > 0:
            grad *= 1 - (capped / softcap) ** 2
        logits.copy_(grad.mul_(valid[:, None]))
    return loss


def chunked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    ignore_index: int,
    chunk_size: int,
    softcap: Optional[float],
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """The op's body: (losses [T] fp32, grad_hidden [T, D] (or [0, D]) of sum(losses)), chunk by chunk."""
    T, D = hidden.shape
    V = weight.shape[0]
    ce_rows_ = kernel("cross_entropy_rows", backend)
    cap = float(softcap) if softcap is not None else 0.0
    bias_c = bias.to(weight.dtype) if bias is not None else None
    losses = hidden.new_empty(T, dtype=torch.float32)
    grad_hidden = hidden.new_empty(T if compute_grad else 0, D)
    chunk = max(1, min(chunk_size, T))
    logits_buf = hidden.new_empty(chunk, V, dtype=weight.dtype)  # the only [chunk, V] allocation, reused
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        h = hidden[start:end].to(weight.dtype)
        logits = logits_buf[: end - start]
        if bias_c is not None:
            torch.addmm(bias_c, h, weight.t(), out=logits)
        else:
            torch.mm(h, weight.t(), out=logits)
        losses[start:end] = ce_rows_(logits, labels[start:end], ignore_index, cap, compute_grad)
        if compute_grad:
            if weight.dtype == hidden.dtype:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            else:
                grad_hidden[start:end] = logits @ weight
    return losses, grad_hidden


def labels_checked_eagerly(labels: Tensor) -> bool:
    """Whether the op raises on out-of-range labels before computing: always off a GPU; on a GPU the check is
    a device-to-host sync per call, so only under LADDER_KERNELS_DEBUG=1. Unchecked, the Triton kernel never
    reads outside the logits and gives such a row a NaN loss (kernels/triton/cross_entropy.py)."""
    return labels.device.type != "cuda" or os.environ.get("LADDER_KERNELS_DEBUG", "0") == "1"


# --- the op --------------------------------------------------------------------------------------------
@torch.library.custom_op("ladder::fused_linear_cross_entropy", mutates_args=())
def _flce_op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    ignore_index: int,
    chunk_size: int,
    softcap: Optional[float],
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    V = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V)) if labels_checked_eagerly(labels) else None
    if bad is not None and bool(bad.any()):
        raise ValueError(
            f"fused_linear_cross_entropy: labels must be in [0, {V}) or ignore_index={ignore_index}, got "
            f"{labels[bad][0].item()}"
        )
    return chunked_linear_cross_entropy(
        hidden, weight, labels.contiguous(), bias, ignore_index, chunk_size, softcap, compute_grad, backend
    )


@_flce_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, chunk_size, softcap, compute_grad, backend):
    T, D = hidden.shape
    return hidden.new_empty(T, dtype=torch.float32), hidden.new_empty(T if compute_grad else 0, D)


def _setup_context(ctx, inputs, output):
    _, grad_hidden = output
    ctx.mark_non_differentiable(grad_hidden)
    ctx.save_for_backward(grad_hidden)
    ctx.compute_grad = inputs[7]


def _backward(ctx, grad_losses, _grad_of_grad_hidden):
    (grad_hidden,) = ctx.saved_tensors
    grad_in = None
    if ctx.needs_input_grad[0]:
        if not ctx.compute_grad:
            raise RuntimeError(
                "fused_linear_cross_entropy: called with compute_grad=False, so it has no gradient to give"
            )
        # Row t's loss depends on hidden[t] only: scaling each stored row by its grad_output is exact.
        grad_in = (grad_hidden.float() * grad_losses.float()[:, None]).to(grad_hidden.dtype)
    return grad_in, None, None, None, None, None, None, None, None


_flce_op.register_autograd(_backward, setup_context=_setup_context)


# --- public entry point --------------------------------------------------------------------------------
def check_cross_entropy_args(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    chunk_size: int,
    reduction: str,
    softcap: Optional[float],
    ignore_index: int,
) -> None:
    op = "fused_linear_cross_entropy"
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: weight must be float32, bfloat16 or float16, got {weight.dtype}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"{op}: labels must be an integer tensor, got {labels.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden's last dim must equal weight's D = {weight.shape[1]}, got hidden of shape "
            f"{tuple(hidden.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{op}: labels must have shape {tuple(hidden.shape[:-1])} (hidden's leading dims), got "
            f"{tuple(labels.shape)}"
        )
    for name, t in (("weight", weight), ("labels", labels)):
        if t.device != hidden.device:
            raise ValueError(f"{op}: {name} is on {t.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{op}: bias must be a float tensor or None, got {getattr(bias, 'dtype', type(bias).__name__)}"
            )
        if bias.shape != (weight.shape[0],) or bias.device != hidden.device:
            raise ValueError(
                f"{op}: bias must have shape ({weight.shape[0]},) on {hidden.device}, got {tuple(bias.shape)} on "
                f"{bias.device}"
            )
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"{op}: softcap must be a positive number or None, got {softcap!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if torch.is_grad_enabled():
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{op}: {name} must be frozen (requires_grad=False): the lm_head gets no gradient here"
                )


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Cross-entropy of (softcapped) hidden @ weight.T (+ bias) against labels, chunk_size tokens at a time.

    hidden [..., D], weight [V, D] (frozen), labels [...] (ignore_index rows count nothing).
    reduction: "mean" over non-ignored labels (0 if there are none), "sum", or "none" (per-token, labels' shape).
    Returns fp32. Differentiable in hidden only. backend: None (by device), "triton", "cpu" or "torch".
    """
    check_cross_entropy_args(hidden, weight, labels, bias, chunk_size, reduction, softcap, ignore_index)
    backend = resolve_backend(hidden.device, backend, "fused_linear_cross_entropy", "cross_entropy_rows")
    compute_grad = torch.is_grad_enabled() and hidden.requires_grad
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    losses, _ = _flce_op(
        hidden2d,
        weight,
        labels.reshape(-1).long(),
        bias,
        ignore_index,
        chunk_size,
        float(softcap) if softcap is not None else None,
        compute_grad,
        backend,
    )
    if reduction == "none":
        return losses.reshape(labels.shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp_min(1)
