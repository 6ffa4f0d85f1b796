"""Triton backend of `ladder::downproj` (z = h @ W^T + b, keeping h for dW in bf16 or int8) and
`ladder::downproj_backward` (dW = g^T @ h, db = sum_rows g).

Forward: one GEMM program per [BLOCK_M, BLOCK_N] tile of z, in h's dtype (W's tile is rounded to it, as
W.to(h.dtype) would be) with fp32 accumulation. The programs of the first column of tiles (pid_n == 0) also
write the kept copy of h while they stream its rows for the matmul: a bf16 copy, or per-row int8 codes;
for int8 they first take each row's absmax in one extra pass over their rows (a row's scale must be known
before any of its codes). Codes: round-half-away(h * 127 / absmax), the rule of ops/downproj.py (layout:
kernels/contracts.py).

Backward: one program per [BLOCK_N, BLOCK_K] tile of dW, looping over the rows of g and h. int8 tiles are
dequantized in registers: codes are exact in bf16/fp16, so the row scale is folded into g's tile and the dot
stays a 16-bit tensor-core dot. The programs of the first column of tiles (pid_k == 0) also sum db.
On a GPU both kernels are autotuned; under TRITON_INTERPRET=1 they take one big-tile config, fp32 dots.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ladder_kernels.backends import triton_interpreting
from ladder_kernels.kernels.contracts import ROW_ABSMAX_FLOOR, empty_downproj_saved
from ladder_kernels.kernels.triton._common import (
    DeviceFacts,
    autotuning_enabled,
    config_problems,
    device_facts,
    dot_in_fp32,
    fp32_dot_precision,
    needs_int64_offsets,
    span,
)

SAVE_NONE, SAVE_BF16, SAVE_INT8 = 0, 1, 2
FWD_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
BWD_TILE_KEYS = ("BLOCK_N", "BLOCK_K", "BLOCK_M")


def _cfg(a: int, b: int, c: int, warps: int, stages: int, keys: tuple[str, ...]) -> triton.Config:
    return triton.Config(dict(zip(keys, (a, b, c))), num_warps=warps, num_stages=stages)


FWD_CONFIGS = [
    _cfg(*c, FWD_TILE_KEYS)
    for c in [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 32, 64, 4, 4),
        (64, 64, 32, 4, 3),  # small fallback: fp32 operands on 99 KiB cards (sm_86 / sm_89)
    ]
]
BWD_CONFIGS = [
    _cfg(*c, BWD_TILE_KEYS)
    for c in [
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 128, 4, 3),
        (64, 64, 32, 4, 3),  # small fallback: fp32 operands on 99 KiB cards (sm_86 / sm_89)
    ]
]
# Without autotuning on a GPU (LADDER_KERNELS_AUTOTUNE=0): the first of these that fits the card (`default_config`).
DEFAULT_FWD_CONFIGS, DEFAULT_BWD_CONFIGS = (FWD_CONFIGS[3], FWD_CONFIGS[5]), (BWD_CONFIGS[3], BWD_CONFIGS[5])
# Under the interpreter: few programs, big tiles (its time grows with programs x loop trips).
INTERPRET_FWD_CONFIG = _cfg(64, 64, 128, 4, 1, FWD_TILE_KEYS)
INTERPRET_BWD_CONFIG = _cfg(64, 128, 64, 4, 1, BWD_TILE_KEYS)


@triton.jit
def _round_half_away(x):
    return tl.where(x >= 0, tl.floor(x + 0.5), -tl.floor(0.5 - x))


@triton.jit
def _downproj_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    z_ptr,
    saved_ptr,
    scale_ptr,
    M,
    N,
    K,
    stride_hm,
    stride_hk,
    stride_wn,
    stride_wk,
    stride_zm,
    stride_sm,
    m_bucket,  # autotuning key only: M rounded up to a power of two
    ABSMAX_FLOOR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAVE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    inv_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if SAVE == 2:
        if pid_n == 0:
            absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                h = tl.load(
                    h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                    mask=mask_m[:, None] & (offs_k[None, :] < K),
                    other=0.0,
                ).to(tl.float32)
                absmax = tl.maximum(absmax, tl.max(tl.abs(h), axis=1))
            nonzero = absmax >= ABSMAX_FLOOR
            inv_scale = tl.where(
                nonzero, tl.div_rn(tl.full((BLOCK_M,), 127.0, tl.float32), tl.maximum(absmax, ABSMAX_FLOOR)), 0.0
            )
            scale = tl.where(nonzero, tl.div_rn(absmax, tl.full((BLOCK_M,), 127.0, tl.float32)), 0.0)
            tl.store(scale_ptr + offs_m, scale, mask=mask_m)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if INDEX_64:
            offs_k = offs_k.to(tl.int64)
        mask_h = mask_m[:, None] & (offs_k[None, :] < K)
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk, mask=mask_h, other=0.0)
        w_t = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=mask_n[None, :] & (offs_k[:, None] < K),
            other=0.0,
        ).to(h_ptr.dtype.element_ty)
        if DOT_FP32:
            acc = tl.dot(h.to(tl.float32), w_t.to(tl.float32), acc, input_precision=FP32_PRECISION)
        else:
            acc = tl.dot(h, w_t, acc)
        if SAVE != 0:
            if pid_n == 0:  # one program column writes each row's kept copy
                saved_ptrs = saved_ptr + offs_m[:, None] * stride_sm + offs_k[None, :]
                if SAVE == 2:
                    codes = _round_half_away(h.to(tl.float32) * inv_scale[:, None])
                    codes = tl.minimum(tl.maximum(codes, -127.0), 127.0)
                    tl.store(saved_ptrs, codes.to(tl.int8), mask=mask_h)
                else:
                    tl.store(saved_ptrs, h.to(tl.bfloat16), mask=mask_h)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(h_ptr.dtype.element_ty).to(tl.float32)[None, :]
    tl.store(
        z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :],
        acc.to(z_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _downproj_bwd_kernel(
    g_ptr,
    saved_ptr,
    scale_ptr,
    gw_ptr,
    gb_ptr,
    M,
    N,
    K,
    stride_gm,
    stride_sm,
    stride_sk,
    m_bucket,  # autotuning key only: M rounded up to a power of two
    INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if INDEX_64:
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if INDEX_64:
            offs_m = offs_m.to(tl.int64)
        mask_m = offs_m < M
        g_t = tl.load(
            g_ptr + offs_m[None, :] * stride_gm + offs_n[:, None], mask=mask_n[:, None] & mask_m[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_M]
        if HAS_BIAS:
            if pid_k == 0:  # one program row sums db
                db += tl.sum(g_t.to(tl.float32), axis=1)
        h = tl.load(
            saved_ptr + offs_m[:, None] * stride_sm + offs_k[None, :] * stride_sk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0,
        )
        if INT8:
            scale = tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0)
            g_t = g_t.to(tl.float32) * scale[None, :]
            if not DOT_FP32:  # |code| <= 127: exact in bf16 / fp16, so the dot stays 16-bit
                g_t = g_t.to(g_ptr.dtype.element_ty)
                h = h.to(tl.float32).to(g_ptr.dtype.element_ty)
        if DOT_FP32:
            acc = tl.dot(g_t.to(tl.float32), h.to(tl.float32), acc, input_precision=FP32_PRECISION)
        else:
            acc = tl.dot(g_t, h.to(g_ptr.dtype.element_ty), acc)

    tl.store(
        gw_ptr + offs_n[:, None] * K + offs_k[None, :],
        acc.to(gw_ptr.dtype.element_ty),
        mask=mask_n[:, None] & mask_k[None, :],
    )
    if HAS_BIAS:
        tl.store(gb_ptr + offs_n, db.to(gb_ptr.dtype.element_ty), mask=mask_n & (pid_k == 0))


# Not below sm_90: 128x32x64 w4 s4 spills (8 B, forward without a kept copy) on sm_80-89 (bench/results/gpu_aot.md).
PRE_HOPPER_EXCLUDED = (FWD_CONFIGS[4],)


def prune_configs(configs: list[triton.Config], facts: DeviceFacts, dot_fp32: bool) -> list[triton.Config]:
    """The configs a card with these facts autotunes over: its capability's (`PRE_HOPPER_EXCLUDED`) whose
    pipelined operand tiles fit its shared memory (`config_problems`); never empty (the smallest when none fits)."""
    operand_bytes = 4 if dot_fp32 else 2
    keys = tuple(configs[0].kwargs)
    limit = facts.shared_memory_per_block
    if facts.capability < 90:
        configs = [c for c in configs if all(c is not x for x in PRE_HOPPER_EXCLUDED)] or configs
    fitting = [c for c in configs if not config_problems(c, keys, operand_bytes, limit)]
    return fitting or [min(configs, key=lambda c: c.num_stages * sum(c.kwargs[k] for k in keys))]


def _prune(configs, named_args, **kwargs):
    """The autotuners' early_config_prune: `prune_configs` for the device of the operand."""
    operand = named_args["h_ptr"] if "h_ptr" in named_args else named_args["g_ptr"]
    return prune_configs(configs, device_facts(operand.device), kwargs["DOT_FP32"])


_fwd_autotuned = triton.autotune(
    configs=FWD_CONFIGS,
    key=["m_bucket", "N", "K", "SAVE", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(_downproj_fwd_kernel)
_bwd_autotuned = triton.autotune(
    configs=BWD_CONFIGS,
    key=["m_bucket", "N", "K", "INT8", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(_downproj_bwd_kernel)


def _m_bucket(m: int) -> int:
    """Autotune once per power-of-two bucket of rows, not once per sequence length."""
    return min(triton.next_power_of_2(m), 65536)


def default_config(preferred: tuple[triton.Config, ...], facts: DeviceFacts, dot_fp32: bool) -> triton.Config:
    """The first of `preferred` whose operand tiles fit the card's shared memory (else the last)."""
    keys = tuple(preferred[0].kwargs)
    limit = facts.shared_memory_per_block
    operand_bytes = 4 if dot_fp32 else 2
    return next((c for c in preferred if not config_problems(c, keys, operand_bytes, limit)), preferred[-1])


def _launch(kernel, autotuned, defaults: tuple[triton.Config, ...], interpret_config, grid, args, meta) -> None:
    if autotuning_enabled():
        autotuned[grid](*args, **meta)
        return
    if triton_interpreting():
        cfg = interpret_config
    else:
        cfg = default_config(defaults, device_facts(args[0].device), meta["DOT_FP32"])
    kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def launch_forward(
    h2d: Tensor, weight: Tensor, bias: Optional[Tensor], z: Tensor, saved: Optional[Tensor], scale: Optional[Tensor]
) -> None:
    """Write z [M, d] (h2d's dtype), and the kept copy of h: `saved` int8 [M, D] with `scale` fp32 [M], or
    `saved` bf16 [M, D] with scale None, or nothing (saved None). Outputs must be contiguous."""
    m, k = h2d.shape
    n = weight.shape[0]
    if m == 0:
        return
    save = SAVE_NONE if saved is None else (SAVE_INT8 if saved.dtype == torch.int8 else SAVE_BF16)
    dummy = z  # never dereferenced: the constexpr flags switch those loads/stores off
    args = (
        h2d,
        weight,
        bias if bias is not None else dummy,
        z,
        saved if saved is not None else dummy,
        scale if scale is not None else dummy,
        m,
        n,
        k,
        h2d.stride(0),
        h2d.stride(1),
        weight.stride(0),
        weight.stride(1),
        z.stride(0),
        saved.stride(0) if saved is not None else 0,
        _m_bucket(m),
    )
    meta = dict(
        ABSMAX_FLOOR=ROW_ABSMAX_FLOOR,
        HAS_BIAS=bias is not None,
        SAVE=save,
        DOT_FP32=dot_in_fp32(h2d.dtype),
        FP32_PRECISION=fp32_dot_precision(),
        INDEX_64=needs_int64_offsets(span(h2d), span(weight), span(z)),
    )
    grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))  # noqa: E731
    _launch(_downproj_fwd_kernel, _fwd_autotuned, DEFAULT_FWD_CONFIGS, INTERPRET_FWD_CONFIG, grid, args, meta)


def launch_backward(g2d: Tensor, saved: Tensor, scale: Tensor, grad_w: Tensor, grad_b: Optional[Tensor]) -> None:
    """Write grad_w [d, D] (contiguous) = g2d^T @ h and, if given, grad_b [d] = g2d.sum(0); h is `saved`
    (int8 codes with `scale` [M], or a 16-bit / fp32 copy of h, any strides)."""
    m, n = g2d.shape
    k = saved.shape[1]
    if m == 0:
        grad_w.zero_()
        if grad_b is not None:
            grad_b.zero_()
        return
    int8 = saved.dtype == torch.int8
    args = (
        g2d,
        saved,
        scale if int8 else g2d,
        grad_w,
        grad_b if grad_b is not None else grad_w,
        m,
        n,
        k,
        g2d.stride(0),
        saved.stride(0),
        saved.stride(1),
        _m_bucket(m),
    )
    meta = dict(
        INT8=int8,
        HAS_BIAS=grad_b is not None,
        DOT_FP32=dot_in_fp32(g2d.dtype) or saved.dtype == torch.float32,
        FP32_PRECISION=fp32_dot_precision(),
        INDEX_64=needs_int64_offsets(span(g2d), span(saved), grad_w.numel()),
    )
    grid = lambda cfg: (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))  # noqa: E731
    _launch(_downproj_bwd_kernel, _bwd_autotuned, DEFAULT_BWD_CONFIGS, INTERPRET_BWD_CONFIG, grid, args, meta)


def forward(h2d: Tensor, weight: Tensor, bias: Optional[Tensor], storage: str) -> tuple[Tensor, Tensor, Tensor]:
    """The `ladder::downproj` contract (see ops/downproj.py): (z, kept h, int8 row scales or empty)."""

    m, k = h2d.shape
    z = h2d.new_empty(m, weight.shape[0])
    saved, scale = empty_downproj_saved(h2d, storage, m, k)
    launch_forward(h2d, weight, bias, z, saved if saved.numel() else None, scale if storage == "int8" else None)
    return z, saved, scale


def backward(
    g2d: Tensor, saved: Tensor, scale: Tensor, weight_dtype: torch.dtype, bias_dtype: Optional[torch.dtype]
) -> tuple[Tensor, Tensor]:
    """The `ladder::downproj_backward` contract: (grad_weight [d, D] in weight_dtype, grad_bias [d] or empty)."""
    n, k = g2d.shape[1], saved.shape[1]
    grad_w = g2d.new_empty(n, k, dtype=weight_dtype)
    grad_b = g2d.new_empty(n, dtype=bias_dtype) if bias_dtype is not None else g2d.new_empty(0, dtype=torch.float32)
    launch_backward(g2d.contiguous(), saved, scale, grad_w, grad_b if bias_dtype is not None else None)
    return grad_w, grad_b


__all__ = ["forward", "backward", "launch_forward", "launch_backward", "FWD_CONFIGS", "BWD_CONFIGS"]
