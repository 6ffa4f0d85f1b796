"""Triton row-wise cross-entropy of `ladder::fused_linear_cross_entropy` (Liger-Kernel's cross_entropy design).

One program per row of a [n, V] logits chunk: an online softmax over V in BLOCK_V steps (running max and
rescaled sum of exponentials, fp32) gives logsumexp and the loss; when a gradient is wanted, a second pass
overwrites the row in place with d(loss)/d(logits) = softmax - onehot (times 1 - tanh^2 under a softcap).
Ignored rows get loss 0 and, with grad, a zero row. The matmuls around it are cuBLAS (torch.mm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ladder_kernels.backends import triton_interpreting
from ladder_kernels.kernels.triton._common import needs_int64_offsets, span

# Under the interpreter one big block per row (its time grows with programs x loop trips).
GPU_BLOCK_V, INTERPRET_BLOCK_V = 4096, 8192


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): saturates to +-1 without overflow (libdevice's tanh is unavailable when interpreting).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _softcapped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
    return x


@triton.jit
def _ce_rows_kernel(
    logits_ptr,
    labels_ptr,
    loss_ptr,
    V,
    stride_row,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    if INDEX_64:
        row = row.to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)

    if label == ignore_index:
        if COMPUTE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                tl.store(row_ptr + offs, tl.zeros((BLOCK_V,), dtype=logits_ptr.dtype.element_ty), mask=offs < V)
        tl.store(loss_ptr + row, 0.0)
    else:
        # pass 1: online logsumexp over V
        running_max = -float("inf")
        running_sum = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = _softcapped(tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            x = tl.where(mask, x, -float("inf"))  # after the cap: softcap * tanh(-inf) would be -softcap
            block_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - block_max) + tl.sum(tl.exp(x - block_max), axis=0)
            running_max = block_max
        lse = running_max + tl.log(running_sum)
        # A label outside [0, V) (unchecked on a GPU: ops/cross_entropy.py) is never read: its loss is NaN.
        in_range = (label >= 0) & (label < V)
        x_label = tl.load(row_ptr + label, mask=in_range, other=0.0).to(tl.float32)
        x_label = _softcapped(x_label, softcap, HAS_SOFTCAP)
        tl.store(loss_ptr + row, tl.where(in_range, lse - x_label, float("nan")))

        # pass 2: d loss / d logits, written over the logits (x_label was read above)
        if COMPUTE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                mask = offs < V
                x = _softcapped(tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
                grad = tl.exp(x - lse) - tl.where(offs == label, 1.0, 0.0)
                if HAS_SOFTCAP:
                    t = x / softcap
                    grad = grad * (1.0 - t * t)
                tl.store(row_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def ce_rows_(logits: Tensor, labels: Tensor, ignore_index: int, softcap: float, compute_grad: bool) -> Tensor:
    """Per-row CE loss (fp32 [n], 0 on ignored rows) of logits [n, V] (rows contiguous); with compute_grad,
    logits is overwritten by d loss_row / d logits. softcap > 0 caps logits at softcap * tanh(x / softcap)."""
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"ce_rows_: logits rows must be contiguous (stride 1 along V), got strides {logits.stride()}")
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return losses
    block_v = min(INTERPRET_BLOCK_V if triton_interpreting() else GPU_BLOCK_V, triton.next_power_of_2(vocab))
    _ce_rows_kernel[(n,)](
        logits,
        labels.contiguous(),
        losses,
        vocab,
        logits.stride(0),
        ignore_index,
        float(softcap),
        HAS_SOFTCAP=softcap > 0,
        COMPUTE_GRAD=compute_grad,
        INDEX_64=needs_int64_offsets(span(logits)),
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 4096 else 4,
    )
    return losses


__all__ = ["ce_rows_"]
