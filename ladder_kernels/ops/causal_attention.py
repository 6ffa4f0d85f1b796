"""`causal_attention(q, k, v)`: causal self-attention for the side network's small heads on CPU.

q [B, heads, T, head_dim], k and v [B, kv_heads, T, head_dim] (grouped-query: query head h reads kv head
h // (heads // kv_heads)); query i sees keys 0..i; softmax scale 1/sqrt(head_dim). The same result as
`F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`, which it replaces where it is
faster: torch's CPU flash attention tiles for large heads, and at the side's head_dim 8 over 1024 tokens its
forward and backward take about 3x as long as this kernel (bench/results/side_attention_cpu.md). The kernel
keeps only the per-row logsumexp for the backward, like flash attention: nothing T x T is stored.

Ops: `ladder::causal_attention` -> (out, lse [B, heads, T] fp32) and `ladder::causal_attention_backward` ->
(dq, dk, dv), fp32 in and out (the public entry casts); autograd through the first via the second.

Backends (chosen per call by `ladder_kernels.backends.resolve_backend`; CPU tensors only):
  cpu     torch.ops.ladder_cpu.causal_attention / _backward   (csrc/causal_attention.cpp)
  torch   the reference below
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

from ladder_kernels.backends import kernel, register_reference, resolve_backend

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- reference (the oracle the cpu backend is tested against; any float dtype) -------------------------
def _expanded_kv(k: Tensor, heads: int) -> Tensor:
    return k.repeat_interleave(heads // k.shape[1], dim=1)


def _causal_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    s = (q @ _expanded_kv(k, q.shape[1]).transpose(-1, -2)) * scale
    T = q.shape[2]
    return s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))


@register_reference("causal_attention")
def reference_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    s = _causal_scores(q, k, scale)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]) @ _expanded_kv(v, q.shape[1]), lse


@register_reference("causal_attention_backward")
def reference_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    B, H, T, hd = q.shape
    kv = k.shape[1]
    p = torch.exp(_causal_scores(q, k, scale) - lse[..., None])  # [B, H, T, T]
    ds = p * (grad_out @ _expanded_kv(v, H).transpose(-1, -2) - (grad_out * out).sum(-1, keepdim=True))
    dq = (ds @ _expanded_kv(k, H)) * scale
    dk = ((ds.transpose(-1, -2) @ q) * scale).view(B, kv, H // kv, T, hd).sum(2)  # a kv head's group summed
    dv = (p.transpose(-1, -2) @ grad_out).view(B, kv, H // kv, T, hd).sum(2)
    return dq, dk, dv


# --- the ops -------------------------------------------------------------------------------------------
@torch.library.custom_op("ladder::causal_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return kernel("causal_attention", backend)(q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3])


@torch.library.custom_op("ladder::causal_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return kernel("causal_attention_backward", backend)(grad_out, q, k, v, out, lse, scale)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


# FlopCounterMode counts these as the planner's model does (planning/flops.py): every q x k pair as SDPA's formula
# does, the backward as twice the forward (the scores it recomputes are not counted); tests compare the two.
@register_flop_formula(torch.ops.ladder.causal_attention)
def _forward_flops(q_shape, k_shape, v_shape, *_args, **_kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


@register_flop_formula(torch.ops.ladder.causal_attention_backward)
def _backward_flops(grad_out_shape, q_shape, k_shape, v_shape, *_args, **_kwargs) -> int:
    return 2 * sdpa_flop_count(q_shape, k_shape, v_shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out.contiguous(), q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --- public entry point --------------------------------------------------------------------------------
def check_causal_attention_args(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"causal_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"causal_attention: {name} must be 4-D [B, heads, T, head_dim], got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.dtype not in _FLOAT_DTYPES or t.device != q.device:
            raise TypeError(
                f"causal_attention: q, k, v must share one float dtype and device, got {name} {t.dtype} on "
                f"{t.device} and q {q.dtype} on {q.device}"
            )
    B, H, T, hd = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, hd) or k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(
            f"causal_attention: k and v must be [B, kv_heads, T, head_dim] = [{B}, kv_heads, {T}, {hd}] with heads "
            f"({H}) a multiple of kv_heads, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str | None = None) -> Tensor:
    """Causal (grouped-query) self-attention, softmax scale 1/sqrt(head_dim): [B, heads, T, head_dim] in q's dtype.

    Computes in fp32 whatever q's dtype; differentiable in q, k and v. backend: None (cpu if the extension has
    the kernel, else torch), "cpu" or "torch"; CPU tensors only (on a GPU use F.scaled_dot_product_attention).
    """
    check_causal_attention_args(q, k, v)
    if q.device.type != "cpu":
        raise ValueError(f"causal_attention: needs CPU tensors, got device {q.device}")
    chosen = resolve_backend(q.device, backend, "causal_attention", "causal_attention")
    scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    out, _ = _attention_op(q.float(), k.float(), v.float(), scale, chosen)
    return out.to(q.dtype)
