"""Pieces shared by the Triton kernels: the interpreter / autotune switches, device facts, config checks, and
`nf4_tile`, the in-register NF4 dequantization of one weight tile that every kernel reading a packed NF4
weight (matmul, down-projection, LM head cross-entropy) reuses.

Interpreter sharp edges (DESIGN.md): `tl.dot` on bf16/fp16 operands returns garbage under TRITON_INTERPRET=1,
so kernels take a DOT_FP32 constexpr (see `dot_in_fp32`); autotuning needs a GPU driver to time configs, so
launchers call the bare kernel with one config when interpreting (see `autotuning_enabled`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ladder_kernels.backends import triton_interpreting
from ladder_kernels.quant.nf4 import check_absmax_args

# Offsets are int32 unless a tensor spans this many elements; then kernels take their INDEX_64 path.
INT32_SPAN_LIMIT = 2**31 - 1
# Opt-in shared memory per block by compute capability (CUDA C programming guide, "Technical Specifications"):
# the fallback when torch does not report shared_memory_per_block_optin. A config above it can never launch.
SHARED_MEMORY_PER_BLOCK = {
    70: 98304,
    75: 65536,
    80: 166912,
    86: 101376,
    87: 166912,
    89: 101376,
    90: 232448,
    100: 232448,
    120: 101376,
}
# What a CUDA device of unknown capability (or no device: the interpreter, the AOT check's meta tensors) is
# assumed to be: an H100/H200.
DEFAULT_CAPABILITY = 90


@dataclass(frozen=True)
class DeviceFacts:
    """What the launchers' pruning and defaults need to know about a GPU: compute capability as an int (86 for
    sm_86), opt-in shared memory per block in bytes, streaming multiprocessors."""

    capability: int
    shared_memory_per_block: int
    sm_count: int


# Typical SM counts (A100, RTX 3090, RTX 4090, H100 SXM), used only where no device is there to ask.
_TYPICAL_SM_COUNT = {80: 108, 86: 82, 89: 128, 90: 132}


def facts_for(capability: int, shared_memory_per_block: int | None = None, sm_count: int | None = None) -> DeviceFacts:
    """DeviceFacts of a card of `capability` (limits from the table unless given): for tests and the AOT check."""
    limit = shared_memory_per_block
    if limit is None:
        known = [c for c in SHARED_MEMORY_PER_BLOCK if c <= capability]
        limit = SHARED_MEMORY_PER_BLOCK[max(known)] if known else min(SHARED_MEMORY_PER_BLOCK.values())
    return DeviceFacts(capability, limit, sm_count or _TYPICAL_SM_COUNT.get(capability, 4))


_assumed: list[DeviceFacts] = []


@contextlib.contextmanager
def assume_device(facts: DeviceFacts) -> Iterator[DeviceFacts]:
    """Within the block, `device_facts` answers `facts` for every device: the launchers prune and choose
    defaults as they would on that card (the AOT check, CPU tests of the pruning)."""
    _assumed.append(facts)
    try:
        yield facts
    finally:
        _assumed.pop()


@functools.cache
def _cuda_facts(device_index: int) -> DeviceFacts:
    props = torch.cuda.get_device_properties(device_index)
    capability = props.major * 10 + props.minor
    table = facts_for(capability)
    limit = getattr(props, "shared_memory_per_block_optin", 0) or table.shared_memory_per_block
    return DeviceFacts(capability, limit, props.multi_processor_count)


def device_facts(device: torch.device) -> DeviceFacts:
    """The facts of `device` (a CUDA device: asked of the driver once); inside `assume_device`, the assumed ones;
    any other device (interpreter, meta): an sm_90 card with 4 SMs (keeps the interpreter's programs few)."""
    if _assumed:
        return _assumed[-1]
    if device.type == "cuda":
        return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())
    return facts_for(DEFAULT_CAPABILITY, sm_count=4)


def autotuning_enabled() -> bool:
    """Autotune on a GPU unless LADDER_KERNELS_AUTOTUNE=0 (quick runs, tests); never when interpreting."""
    return not triton_interpreting() and os.environ.get("LADDER_KERNELS_AUTOTUNE", "1") != "0"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot must take fp32 operands: fp32 inputs, or the interpreter (its bf16/fp16 dot is broken)."""
    return dtype == torch.float32 or triton_interpreting()


def fp32_dot_precision() -> str:
    """tl.dot input_precision for fp32 operands: "tf32x3" on a GPU (fp32-accurate on tensor cores; "ieee"
    compiles to FMA loops that spill heavily at these tile sizes), "ieee" in the interpreter."""
    return "ieee" if triton_interpreting() else "tf32x3"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a fixed 4 when interpreting: keeps the programs few)."""
    return device_facts(device).sm_count


def needs_int64_offsets(*spans: int) -> bool:
    """True when any tensor spans more elements than int32 offsets reach."""
    return max(spans) > INT32_SPAN_LIMIT


def span(t: torch.Tensor) -> int:
    """Elements between a tensor's first and last addressed element (its offset range), strides included."""
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def config_problems(
    config: triton.Config,
    tile_keys: tuple[str, ...],
    operand_bytes: int = 2,
    shared_memory_limit: int = SHARED_MEMORY_PER_BLOCK[DEFAULT_CAPABILITY],
) -> list[str]:
    """Why `config` is not valid on a GPU (empty list when it is): dot tiles power-of-two and >= 16, sane
    warps and stages, and the pipelined operand tiles fitting in `shared_memory_limit` bytes."""
    problems = []
    kw = config.kwargs
    for key in tile_keys:
        v = kw.get(key)
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            problems.append(f"{key}={v!r} must be a power of two >= 16")
    if config.num_warps not in (1, 2, 4, 8, 16):
        problems.append(f"num_warps={config.num_warps} must be one of 1, 2, 4, 8, 16")
    if not 1 <= config.num_stages <= 6:
        problems.append(f"num_stages={config.num_stages} must be between 1 and 6")
    if not problems and len(tile_keys) == 3:
        m, p, r = (kw[key] for key in tile_keys)
        smem = (m * r + r * p) * operand_bytes * config.num_stages  # rough: every stage holds both operand tiles
        if smem > shared_memory_limit:
            problems.append(f"operand tiles need {smem} B of shared memory, more than {shared_memory_limit}")
    return problems


def check_nf4_operands(
    name: str,
    a: Tensor,
    packed: Tensor,
    stats: tuple,
    n: int,
    k: int,
    blocksize: int,
    reduce_dim: int,
    bias: Optional[Tensor],
    out: Optional[Tensor],
    out_cols: int,
) -> None:
    """The nf4_matmul launchers' checks: ValueError/TypeError naming the argument, before anything reaches a kernel
    (which would read out of bounds rather than fail). a [M, reduce_dim] is the operand named `name`; stats:
    (absmax, code, nested_absmax, nested_code, offset)."""
    absmax, code, nested_absmax, nested_code, offset = stats
    if not isinstance(a, Tensor) or a.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [M, {reduce_dim}], got {getattr(a, 'shape', type(a).__name__)}")
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {a.dtype}")
    if a.shape[1] != reduce_dim:
        raise ValueError(f"{name} must have {reduce_dim} columns, got shape {tuple(a.shape)}")
    if not (isinstance(n, int) and isinstance(k, int) and n > 0 and k > 0):
        raise ValueError(f"n and k must be positive ints, got n={n!r}, k={k!r}")
    if not isinstance(blocksize, int) or blocksize < 32 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 32, got {blocksize!r}")
    if packed.dtype != torch.uint8 or packed.numel() != (n * k + 1) // 2:
        raise ValueError(
            f"packed must be uint8 with {(n * k + 1) // 2} bytes for a [{n}, {k}] weight, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    check_absmax_args(absmax, nested_absmax, nested_code, offset, triton.cdiv(n * k, blocksize), "nf4_matmul[triton]")
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(f"code must be the 16-entry float32 NF4 table, got {code.dtype} with {code.numel()}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a floating tensor of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
    if out is not None and (out.shape != (a.shape[0], out_cols) or out.dtype != a.dtype):
        raise ValueError(
            f"out must be {a.dtype} of shape ({a.shape[0]}, {out_cols}), got {out.dtype} {tuple(out.shape)}"
        )
    devices = {t.device for t in (a, packed, *stats, bias, out) if t is not None}
    if len(devices) != 1:
        raise ValueError(
            f"{name}, packed, absmax, code, nested statistics, bias and out must be on one device, got "
            f"{sorted(map(str, devices))}"
        )
    if a.device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"{name} must be a CUDA tensor for the Triton backend (or set TRITON_INTERPRET=1), got {a.device}"
        )


@triton.jit
def block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask, NESTED: tl.constexpr):
    """The fp32 absmax of quantization blocks `block` (0 where ~mask). NESTED (double quantization): absmax_ptr
    holds uint8 codes and the absmax is nested_code[code] * nested_absmax[block // 256] + offset, decoded here
    from the 1 KiB table and the per-256-block scales (cache-resident), as bitsandbytes rounds it."""
    if NESTED:
        codes = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + codes) * tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        return tl.where(mask, scale + tl.load(offset_ptr), 0.0)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def nf4_tile(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    rows,
    col0,
    n_rows,
    n_cols,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    ROWS_HOLD_WHOLE_BLOCKS: tl.constexpr,
    NESTED: tl.constexpr,
):
    """W[rows, col0:col0+BLOCK_COLS] of an NF4 weight W [n_rows, n_cols], as fp32 [BLOCK_ROWS, BLOCK_COLS];
    0 outside W. `rows` holds BLOCK_ROWS row indices (int32, or int64 for weights past 2**31 elements);
    col0 is a multiple of BLOCK_COLS (a power of two). The absmax is read as `block_scale` does (NESTED: the
    double-quantized codes and their statistics).

    bitsandbytes' flat-block layout: element i of W's row-major flattening is in byte i >> 1 (high nibble
    when i is even) and scaled by absmax[i // BLOCKSIZE]; blocks straddle rows unless
    ROWS_HOLD_WHOLE_BLOCKS (n_cols % BLOCKSIZE == 0, true of every real model's layers).
    """
    if ROWS_HOLD_WHOLE_BLOCKS:
        # Rows of whole blocks have an even length: each byte holds two neighbours of one row (even column in
        # the high nibble) and each block's absmax is loaded once, then both are spread over the tile.
        byte_cols = col0 // 2 + tl.arange(0, BLOCK_COLS // 2)
        byte_mask = (rows[:, None] < n_rows) & (byte_cols[None, :] < n_cols // 2)
        byte = tl.load(packed_ptr + rows[:, None] * (n_cols // 2) + byte_cols[None, :], mask=byte_mask, other=0)
        byte = byte.to(tl.int32)
        even = tl.load(code_ptr + (byte >> 4))
        odd = tl.load(code_ptr + (byte & 15))
        if BLOCK_COLS <= BLOCKSIZE:  # the tile lies inside one block of each row
            block = rows * (n_cols // BLOCKSIZE) + col0 // BLOCKSIZE
            scale = block_scale(
                absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, rows < n_rows, NESTED
            )
            scale = scale[:, None]
        else:
            blocks: tl.constexpr = BLOCK_COLS // BLOCKSIZE
            block_cols = col0 // BLOCKSIZE + tl.arange(0, blocks)
            block = rows[:, None] * (n_cols // BLOCKSIZE) + block_cols[None, :]
            mask = (rows[:, None] < n_rows) & (block_cols[None, :] < n_cols // BLOCKSIZE)
            scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask, NESTED)
            scale = tl.reshape(
                tl.broadcast_to(scale[:, :, None], (BLOCK_ROWS, blocks, BLOCKSIZE // 2)), (BLOCK_ROWS, BLOCK_COLS // 2)
            )
        return tl.reshape(tl.join(even * scale, odd * scale), (BLOCK_ROWS, BLOCK_COLS))
    else:
        # Blocks straddle rows (and odd rows alternate nibble parity): address each element on its own.
        cols = col0 + tl.arange(0, BLOCK_COLS)
        idx = rows[:, None] * n_cols + cols[None, :]
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (byte >> (((idx & 1) ^ 1) * 4).to(tl.int32)) & 15
        scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, idx // BLOCKSIZE, mask, NESTED)
        return tl.load(code_ptr + nibble) * scale
