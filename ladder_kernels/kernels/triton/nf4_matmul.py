"""Triton backend of `ladder::nf4_matmul`: x @ W^T (+ bias) and its input gradient g @ W, with W an NF4
weight [N, K] dequantized tile by tile in registers (no 16-bit copy of W is ever made).

One GEMM kernel serves both directions, C[M, P] = A[M, R] @ B with B[R, P] read from the packed weight:
  forward      A = x [M, K],  B = W^T  (P = N, R = K)
  grad_input   A = g [M, N],  B = W    (P = K, R = N): tiles W[n0:n1, k0:k1], looping over n
Each loop step loads A's tile, dequantizes B's tile (`_common.nf4_tile`), rounds it to A's dtype (what a
16-bit weight would hold) and accumulates a tl.dot in fp32. When K % blocksize == 0 (every real model)
a byte is two neighbours of one row and absmax is read once per block; otherwise (blocks straddle rows)
each element is addressed on its own, which needs smaller tiles (see `fits_shared_memory`). Two launch paths:
  M > 16   tiles up to 256 wide, grouped program order so neighbouring programs share W's bytes in L2;
  M <= 16  (decode) BLOCK_M = 16 and the reduction split over SPLIT programs, which fp32-atomically add
           into a zeroed buffer (summation order, hence the last bits, then vary from run to run).
On a GPU both paths are autotuned per (M bucket, P, R, dtypes); under TRITON_INTERPRET=1 each takes one
fixed config with fp32 dot operands.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ladder_kernels.backends import triton_interpreting
from ladder_kernels.kernels.triton._common import (
    DeviceFacts,
    autotuning_enabled,
    check_nf4_operands,
    config_problems,
    device_facts,
    dot_in_fp32,
    fp32_dot_precision,
    needs_int64_offsets,
    nf4_tile,
    span,
)

SMALL_M = 16  # at or below this many rows the split-reduction (decode) path is taken
TILE_KEYS = ("BLOCK_M", "BLOCK_P", "BLOCK_R")


def _cfg(bm, bp, br, warps, stages, split=1, group_m=8):
    return triton.Config(
        dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_R=br, SPLIT=split, GROUP_M=group_m), num_warps=warps, num_stages=stages
    )


# Prefill / training on sm_90+ (wgmma, 227 KiB of shared memory, no spills at 255 registers): the tutorial
# matmul's tiles plus wider reduction steps (dequantization is amortized over BLOCK_M rows, so taller tiles pay
# more here than in a plain GEMM).
LARGE_M_CONFIGS = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 32, 4, 4),
    _cfg(64, 256, 32, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(32, 64, 128, 4, 4),
    _cfg(32, 128, 64, 4, 3),
]
# Below sm_90 (mma.sync; sm_86/89 have 99 KiB per block): no 128x256 / 256x128 tiles (they spill 200-400 B and
# exceed 99 KiB for grad_input), 8 warps for every 128-wide tile (4 warps spill there: bench/results/gpu_aot.md).
LARGE_M_CONFIGS_PRE_HOPPER = [
    LARGE_M_CONFIGS[2],  # 128x128x64 w8 s3
    _cfg(128, 64, 64, 8, 3),
    _cfg(64, 128, 64, 8, 3),
    LARGE_M_CONFIGS[7],  # 64x64x64 w4 s4
    LARGE_M_CONFIGS[8],  # 32x64x128 w4 s4
]
# Decode: memory-bound, so the split count is what fills the GPU; W is read exactly once either way.
SMALL_M_CONFIGS = [
    _cfg(16, 32, 128, 4, 4, split=1, group_m=1),
    _cfg(16, 32, 128, 4, 4, split=4, group_m=1),
    _cfg(16, 64, 128, 4, 4, split=2, group_m=1),
    _cfg(16, 64, 128, 4, 3, split=4, group_m=1),
    _cfg(16, 64, 256, 4, 3, split=8, group_m=1),
    _cfg(16, 128, 64, 4, 4, split=8, group_m=1),
    _cfg(16, 128, 128, 8, 3, split=4, group_m=1),
    _cfg(16, 32, 256, 4, 3, split=16, group_m=1),
]
# Small tiles for every card: when blocks straddle rows (K % blocksize != 0) each element is staged on its own,
# and on 99 KiB cards only these fit.
LARGE_M_FALLBACK_CONFIGS = [_cfg(64, 64, 32, 4, 3), _cfg(32, 64, 32, 4, 2)]
SMALL_M_FALLBACK_CONFIGS = [_cfg(16, 64, 64, 4, 2, split=4, group_m=1), _cfg(16, 32, 64, 4, 2, split=4, group_m=1)]


def configs_for(capability: int, small_m: bool) -> list[triton.Config]:
    """The autotuning candidates of a card of this compute capability, before the shared-memory pruning."""
    if small_m:
        return SMALL_M_CONFIGS + SMALL_M_FALLBACK_CONFIGS
    return (LARGE_M_CONFIGS if capability >= 90 else LARGE_M_CONFIGS_PRE_HOPPER) + LARGE_M_FALLBACK_CONFIGS


def _union(*lists: list[triton.Config]) -> list[triton.Config]:
    out = []
    for config in (c for lst in lists for c in lst):
        if all(config is not c for c in out):
            out.append(config)
    return out


# Under the interpreter: few programs, big tiles (its time grows with programs x loop trips), still GPU-valid.
INTERPRET_LARGE_M_CONFIG = _cfg(64, 64, 64, 4, 1)
INTERPRET_SMALL_M_CONFIG = _cfg(16, 64, 64, 4, 1, split=2, group_m=1)


@triton.jit
def _nf4_gemm_kernel(
    a_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    bias_ptr,
    c_ptr,
    M,
    P,
    R,
    N,
    K,
    stride_am,
    stride_ar,
    stride_cm,
    stride_cp,
    m_bucket,  # autotuning key only: M rounded up to a power of two
    BLOCKSIZE: tl.constexpr,
    GRAD_INPUT: tl.constexpr,
    ALIGNED_K: tl.constexpr,
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    ATOMIC_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M row tiles walk the same column tiles together, so W's bytes are reused in L2.
    pid = tl.program_id(0)
    pid_split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    pids_per_group = GROUP_M * num_pid_p
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_p = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_p = offs_p.to(tl.int64)
    mask_m = offs_m < M

    # This program's share of the reduction: whole BLOCK_R steps, so no tile crosses a split boundary.
    r_per_split = tl.cdiv(tl.cdiv(R, BLOCK_R), SPLIT) * BLOCK_R
    r_start = pid_split * r_per_split
    r_end = tl.minimum(r_start + r_per_split, R)

    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        if INDEX_64:
            offs_r = offs_r.to(tl.int64)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
            mask=mask_m[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )
        if GRAD_INPUT:  # B = W[r0:r0+BLOCK_R, p0:p0+BLOCK_P]
            b = nf4_tile(
                packed_ptr,
                absmax_ptr,
                code_ptr,
                nested_absmax_ptr,
                nested_code_ptr,
                offset_ptr,
                offs_r,
                pid_p * BLOCK_P,
                N,
                K,
                BLOCK_R,
                BLOCK_P,
                BLOCKSIZE,
                ALIGNED_K,
                NESTED,
            )
        else:  # B = W[p0:p0+BLOCK_P, r0:r0+BLOCK_R]^T
            b = nf4_tile(
                packed_ptr,
                absmax_ptr,
                code_ptr,
                nested_absmax_ptr,
                nested_code_ptr,
                offset_ptr,
                offs_p,
                r0,
                N,
                K,
                BLOCK_P,
                BLOCK_R,
                BLOCKSIZE,
                ALIGNED_K,
                NESTED,
            )
            b = tl.trans(b)
        b = b.to(a_ptr.dtype.element_ty)  # the rounding a 16-bit weight would have
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=FP32_PRECISION)
        else:
            acc = tl.dot(a, b, acc)

    mask_p = offs_p < P
    if HAS_BIAS:  # added once: by the first split only
        acc += tl.load(bias_ptr + offs_p, mask=mask_p & (pid_split == 0), other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_p[None, :] * stride_cp
    mask_c = mask_m[:, None] & mask_p[None, :]
    if ATOMIC_OUT:
        tl.atomic_add(c_ptrs, acc, mask=mask_c, sem="relaxed")
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


def fits_shared_memory(
    config: triton.Config, operand_bytes: int, aligned_k: bool, limit: int, nested: bool = False
) -> bool:
    """Shared-memory model fitted to sm_90 builds (e.g. 128x256x64 bf16, 3 stages: 140 KB predicted 139 KB;
    sm_80-89 builds need less: bench/results/gpu_aot.md): per stage the A tile and W's bytes, plus, when blocks
    straddle rows, the per-element bytes and absmax (nested: and the per-element absmax code and nested scale);
    and two buffers of the dequantized B tile. Errs high for fp32 and tall tiles."""
    if config_problems(config, TILE_KEYS, operand_bytes, limit):
        return False
    bm, bp, br = (config.kwargs[key] for key in TILE_KEYS)
    per_element = 0 if aligned_k else 10 if nested else 5
    per_stage = bm * br * operand_bytes + bp * br // 2 + bp * br * per_element
    return per_stage * config.num_stages + 2 * bp * br * operand_bytes <= limit


def prune_configs(
    configs: list[triton.Config],
    facts: DeviceFacts,
    m: int,
    r: int,
    dot_fp32: bool,
    aligned_k: bool,
    nested: bool = False,
) -> list[triton.Config]:
    """The configs of `configs` a card with these facts autotunes over for an [M, R] operand: its capability's
    candidates (`configs_for`) that fit its shared memory, no taller than M needs, no more splits than reduction
    steps; never empty (the smallest-footprint candidate when nothing fits)."""
    allowed = configs_for(facts.capability, small_m=False) + configs_for(facts.capability, small_m=True)
    candidates = [c for c in configs if any(c is a for a in allowed)] or configs
    operand_bytes = 4 if dot_fp32 else 2
    limit = facts.shared_memory_per_block
    fitting = [c for c in candidates if fits_shared_memory(c, operand_bytes, aligned_k, limit, nested)]
    if not fitting:  # nothing fits the model: the config it thinks smallest (still valid on a GPU)
        footprint = lambda c: c.num_stages * c.kwargs["BLOCK_P"] * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_R"])  # noqa: E731
        fitting = [min(candidates, key=footprint)]
    tallest_useful = max(32, triton.next_power_of_2(m))
    r_steps = lambda c: triton.cdiv(r, c.kwargs["BLOCK_R"])  # noqa: E731
    kept = [c for c in fitting if c.kwargs["BLOCK_M"] <= tallest_useful and c.kwargs["SPLIT"] <= r_steps(c)]
    return kept or fitting[:1]


def _prune_configs(configs, named_args, **kwargs):
    """The autotuners' early_config_prune: `prune_configs` for the device of the operand."""
    facts = device_facts(named_args["a_ptr"].device)
    return prune_configs(
        configs, facts, named_args["M"], named_args["R"], kwargs["DOT_FP32"], kwargs["ALIGNED_K"], kwargs["NESTED"]
    )


_AUTOTUNE_KEY = ["m_bucket", "P", "R", "GRAD_INPUT", "BLOCKSIZE", "HAS_BIAS"]
_large_m_autotuned = triton.autotune(
    configs=_union(configs_for(90, small_m=False), configs_for(80, small_m=False)),
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,
)(_nf4_gemm_kernel)
_small_m_autotuned = triton.autotune(
    configs=_union(configs_for(90, small_m=True), configs_for(80, small_m=True)),
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_configs},
    reset_to_zero=["c_ptr"],  # the atomic buffer must start at zero for every timed run
    cache_results=True,
)(_nf4_gemm_kernel)


def default_config(
    m: int, p: int, r: int, dtype: torch.dtype, device: torch.device, aligned_k: bool = True, nested: bool = False
) -> triton.Config:
    """The config used without autotuning (interpreter, or LADDER_KERNELS_AUTOTUNE=0): for the facts of
    `device` (`device_facts`), the preferred tile when it fits the card's shared memory, else the first
    fallback that does."""
    if triton_interpreting():
        return INTERPRET_SMALL_M_CONFIG if m <= SMALL_M else INTERPRET_LARGE_M_CONFIG
    facts = device_facts(device)
    operand_bytes = 4 if dtype == torch.float32 else 2
    if m <= SMALL_M:

        def split(bp: int, br: int) -> int:  # about two programs per SM, a power of two (each compiles once)
            p_tiles, r_steps, n = triton.cdiv(p, bp), triton.cdiv(r, br), 1
            while n < 16 and p_tiles * n * 2 <= 2 * facts.sm_count and n * 2 <= r_steps:
                n *= 2
            return n

        tiles = [(16, 64, 128, 4, 3)] + [
            tuple(c.kwargs[k] for k in TILE_KEYS) + (4, 2) for c in SMALL_M_FALLBACK_CONFIGS
        ]
        preferred = [_cfg(bm, bp, br, w, st, split=split(bp, br), group_m=1) for bm, bp, br, w, st in tiles]
    else:
        bm = 128 if m >= 128 else 64
        br = 32 if dtype == torch.float32 else 64  # fp32 operand tiles are twice the bytes
        warps = 8 if bm == 128 or facts.capability < 90 else 4  # 4 warps spill below sm_90
        preferred = [_cfg(bm, 128, br, warps, 3)] + LARGE_M_FALLBACK_CONFIGS
    limit = facts.shared_memory_per_block
    fits = (c for c in preferred if fits_shared_memory(c, operand_bytes, aligned_k, limit, nested))
    return next(fits, preferred[-1])


def _nf4_gemm(
    a: Tensor,
    packed: Tensor,
    stats: tuple,
    n: int,
    k: int,
    blocksize: int,
    bias: Optional[Tensor],
    grad_input: bool,
    out: Optional[Tensor],
    config: Optional[triton.Config],
) -> Tensor:
    m = a.shape[0]
    p, r = (k, n) if grad_input else (n, k)
    if m == 0:
        return out if out is not None else a.new_empty(0, p)
    absmax, code, nested_absmax, nested_code, offset = stats
    nested = nested_absmax is not None
    packed, absmax, code = packed.reshape(-1).contiguous(), absmax.reshape(-1).contiguous(), code.contiguous()
    if nested:
        nested_absmax, nested_code = nested_absmax.reshape(-1).contiguous(), nested_code.contiguous()
        offset = offset.reshape(1)
    else:  # unused pointers (NESTED=False never reads them)
        nested_absmax = nested_code = offset = absmax

    small = m <= SMALL_M
    if config is None and not autotuning_enabled():
        config = default_config(m, p, r, a.dtype, a.device, aligned_k=k % blocksize == 0, nested=nested)
    atomic_out = config.kwargs["SPLIT"] > 1 if config is not None else small
    if atomic_out:
        c = torch.zeros(m, p, dtype=torch.float32, device=a.device)
    else:
        c = out if out is not None else torch.empty(m, p, dtype=a.dtype, device=a.device)

    args = (
        a,
        packed,
        absmax,
        code,
        nested_absmax,
        nested_code,
        offset,
        bias if bias is not None else code,
        c,
        m,
        p,
        r,
        n,
        k,
        a.stride(0),
        a.stride(1),
        c.stride(0),
        c.stride(1),
        min(triton.next_power_of_2(m), 8192),
    )
    meta = dict(
        BLOCKSIZE=blocksize,
        GRAD_INPUT=grad_input,
        ALIGNED_K=k % blocksize == 0,
        NESTED=nested,
        HAS_BIAS=bias is not None,
        DOT_FP32=dot_in_fp32(a.dtype),
        FP32_PRECISION=fp32_dot_precision(),
        INDEX_64=needs_int64_offsets(n * k, span(a), span(c)),
        ATOMIC_OUT=atomic_out,
    )
    grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_P"]), cfg["SPLIT"])  # noqa: E731
    if config is not None:
        _nf4_gemm_kernel[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        (_small_m_autotuned if small else _large_m_autotuned)[grid](*args, **meta)

    if not atomic_out:
        return c
    if out is None:
        return c.to(a.dtype)
    return out.copy_(c)


def forward(
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
    *,
    out: Optional[Tensor] = None,
    config: Optional[triton.Config] = None,
) -> Tensor:
    """x2d [M, K] @ W^T (+ bias) -> [M, n] in x2d's dtype. W [n, k] is NF4 in bitsandbytes' flat-block order:
    packed uint8 (n*k+1)//2 bytes, code fp32 [16], and absmax either fp32 per block of `blocksize` (nested_*
    None) or double-quantized: uint8 codes per block, fp32 nested_absmax per 256 blocks, the 256-entry fp32
    nested_code and the fp32 offset, decoded in the kernel (`_common.block_scale`).

    x2d may have any strides. out: optional [M, n] tensor to write into. config: a fixed triton.Config
    (BLOCK_M/BLOCK_P/BLOCK_R/SPLIT/GROUP_M) instead of autotuning; SPLIT > 1 takes the atomic split path.
    """
    stats = (absmax, code, nested_absmax, nested_code, offset)
    check_nf4_operands("x2d", x2d, packed, stats, n, k, blocksize, k, bias, out, n)
    return _nf4_gemm(x2d, packed, stats, n, k, blocksize, bias, False, out, config)


def grad_input(
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
    *,
    out: Optional[Tensor] = None,
    config: Optional[triton.Config] = None,
) -> Tensor:
    """g2d [M, n] @ W -> [M, k] in g2d's dtype, W [n, k] as in `forward` (read in transposed order)."""
    stats = (absmax, code, nested_absmax, nested_code, offset)
    check_nf4_operands("g2d", g2d, packed, stats, n, k, blocksize, n, None, out, k)
    return _nf4_gemm(g2d, packed, stats, n, k, blocksize, None, True, out, config)


__all__ = [
    "forward",
    "grad_input",
    "default_config",
    "prune_configs",
    "configs_for",
    "fits_shared_memory",
    "LARGE_M_CONFIGS",
    "LARGE_M_CONFIGS_PRE_HOPPER",
    "SMALL_M_CONFIGS",
    "SMALL_M",
    "TILE_KEYS",
]
