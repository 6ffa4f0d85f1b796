"""NF4 weights, byte-compatible with bitsandbytes.

Format (bitsandbytes `quantize_4bit(quant_type="nf4")`): the weight is flattened row-major over
[out_features, in_features] and cut into blocks of `blocksize` along that flat order (a block may straddle
rows); each block stores its absmax in fp32 and each element the index of the nearest NF4 table entry of
w / absmax. Two codes per byte, element 2i in the high nibble. With double quantization the absmax vector
minus its mean (`offset`) is itself 8-bit blockwise-quantized with the signed dynamic map in blocks of 256.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

# bitsandbytes' NF4 table (create_normal_map(0.9677083)); tests compare it with bitsandbytes' own floats.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NESTED_BLOCKSIZE = 256


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 256 sorted values."""
    with unset_fake_temporarily():  # real values even when first asked for inside FakeTensorMode (the planner)
        data = []
        for i in range(7):
            boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
            means = (boundaries[:-1] + boundaries[1:]) / 2.0
            data += ((10 ** (-6 + i)) * means).tolist()
            data += (-(10 ** (-6 + i)) * means).tolist()
        data += [0.0, 1.0]
        assert len(data) == 256
        return torch.tensor(sorted(data), dtype=torch.float32)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _blockwise_absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax (fp32) and the values scaled into [-1, 1], exactly as bitsandbytes' default kernel."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    body = flat[:full].reshape(full // blocksize, blocksize)
    absmax = body.abs().max(dim=-1)[0]
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)


def _quantize_nested(centered_absmax: torch.Tensor, nested_code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise codes of absmax - offset, and their per-256 absmax.

    bitsandbytes' CPU kernel picks codes by an approximate binary search that differs from nearest rounding
    on about 1 in 1000 near-ties; its own function is used when available so the bytes match it exactly.
    """
    try:
        from bitsandbytes.functional import quantize_blockwise
    except Exception:  # bitsandbytes missing or broken: exact nearest rounding
        nested_absmax, scaled = _blockwise_absmax_and_scaled(centered_absmax, NESTED_BLOCKSIZE)
        return _nearest_code(scaled, nested_code), nested_absmax
    codes, state = quantize_blockwise(centered_absmax, code=nested_code, blocksize=NESTED_BLOCKSIZE)
    return codes, state.absmax.float()


@dataclass
class NF4Weight:
    """A frozen NF4-quantized weight of shape [out_features, in_features].

    packed:         uint8 [ceil(numel/2), 1], two codes per byte (element 2i in the high nibble)
    absmax:         fp32 [n_blocks]; or, double-quantized, uint8 [n_blocks] codes of absmax - offset
    blocksize:      elements per block (power of two, 32..4096)
    shape, dtype:   original weight shape and dtype
    code:           the 16-entry NF4 table (fp32)
    nested_absmax:  fp32 [ceil(n_blocks/256)] (double quantization only)
    nested_code:    fp32 [256] signed dynamic map (double quantization only)
    offset:         fp32 scalar tensor, mean of the original absmax (double quantization only)
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.validate()

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def validate(self) -> None:
        """Raise a ValueError/TypeError naming the field when this is not a well-formed NF4 weight."""
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(
                f"NF4Weight.shape must be 2-D [out_features, in_features] with positive sizes, got {self.shape}"
            )
        _check_blocksize(self.blocksize)
        if not isinstance(self.packed, torch.Tensor) or self.packed.dtype != torch.uint8:
            raise TypeError(
                f"NF4Weight.packed must be a uint8 tensor, got {getattr(self.packed, 'dtype', type(self.packed))}"
            )
        if self.packed.numel() != (self.numel + 1) // 2:
            raise ValueError(
                f"NF4Weight.packed has {self.packed.numel()} bytes, expected {(self.numel + 1) // 2} for shape "
                f"{self.shape}"
            )
        if self.code.numel() != 16 or self.code.dtype != torch.float32:
            raise ValueError(f"NF4Weight.code must be 16 fp32 values, got {self.code.numel()} of {self.code.dtype}")
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(
                f"NF4Weight.absmax has {self.absmax.numel()} entries, expected {self.n_blocks} "
                f"(shape {self.shape}, blocksize {self.blocksize})"
            )
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise TypeError(
                    f"NF4Weight.absmax must be uint8 codes with double quantization, got {self.absmax.dtype}"
                )
            n_nested = -(-self.n_blocks // NESTED_BLOCKSIZE)
            if self.nested_absmax.numel() != n_nested:
                raise ValueError(
                    f"NF4Weight.nested_absmax has {self.nested_absmax.numel()} entries, expected {n_nested}"
                )
            if self.nested_code is None or self.nested_code.numel() != 256:
                raise ValueError("NF4Weight.nested_code must hold the 256-entry dynamic map")
            if self.offset is None or self.offset.numel() != 1:
                raise ValueError("NF4Weight.offset must be a scalar tensor with double quantization")
        elif self.absmax.dtype != torch.float32:
            raise TypeError(f"NF4Weight.absmax must be fp32 without double quantization, got {self.absmax.dtype}")

    def block_absmax(self) -> torch.Tensor:
        """The per-block absmax in fp32, decoded from the nested statistics when double-quantized. The kernels
        read the nested form themselves (`absmax_args`); this materializes 4 bytes per block."""
        return decode_absmax(*self.absmax_args())

    def absmax_args(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """(absmax, nested_absmax, nested_code, offset) as the ops and kernels take them: fp32 absmax and three
        Nones, or, double-quantized, the uint8 codes and the nested statistics (nothing decoded)."""
        return self.absmax, self.nested_absmax, self.nested_code, self.offset

    def to(self, device=None) -> "NF4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            code=move(self.code),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            offset=move(self.offset),
        )

    def nbytes(self) -> int:
        tensors = (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # --- bitsandbytes interop -------------------------------------------------------------------------
    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Weight":
        """Wrap bitsandbytes' packed bytes and QuantState (no copy); any quant_storage dtype is viewed as uint8."""
        if getattr(quant_state, "quant_type", "nf4") != "nf4":
            raise ValueError(f"quant_state.quant_type must be 'nf4', got {quant_state.quant_type!r}")
        shape = tuple(quant_state.shape)
        if len(shape) != 2:
            raise ValueError(f"quant_state.shape must be 2-D, got {shape}")
        data = packed.reshape(-1).view(torch.uint8).reshape(-1, 1)
        kwargs = {}
        if quant_state.nested:
            kwargs = dict(
                nested_absmax=quant_state.state2.absmax.float(),
                nested_code=quant_state.state2.code.float(),
                offset=torch.as_tensor(quant_state.offset, dtype=torch.float32, device=data.device).reshape(()),
            )
            if quant_state.state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(
                    f"quant_state.state2.blocksize must be {NESTED_BLOCKSIZE}, got {quant_state.state2.blocksize}"
                )
        return cls(
            packed=data,
            absmax=quant_state.absmax,
            blocksize=int(quant_state.blocksize),
            shape=shape,
            dtype=quant_state.dtype,
            code=quant_state.code.float().to(data.device),
            **kwargs,
        )

    def to_bnb(self):
        """(packed uint8 [n/2, 1], bitsandbytes QuantState) for bitsandbytes' own functions."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(
                absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
            )
        qs = QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=self.code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )
        return self.packed, qs


def _check_blocksize(blocksize) -> None:
    if not isinstance(blocksize, int) or blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two between 32 and 4096, got {blocksize!r}")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D floating weight [out_features, in_features] to NF4 (bitsandbytes' bytes)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError("w must not be empty")
    _check_blocksize(blocksize)
    # fake tensors (the memory planner) carry no values to check
    if not isinstance(w, FakeTensor) and not torch.isfinite(w).all():
        raise ValueError("w contains NaN or Inf; NF4 cannot represent it")
    code = nf4_code(w.device)
    with torch.no_grad():
        absmax, scaled = _blockwise_absmax_and_scaled(w.reshape(-1).float(), blocksize)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = _nearest_code(scaled, code)
        packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
        kwargs = {}
        if double_quant:
            offset = absmax.mean()
            nested_code = _dynamic_map_cpu().to(w.device)
            absmax, nested_absmax = _quantize_nested(absmax - offset, nested_code)
            kwargs = dict(nested_absmax=nested_absmax, nested_code=nested_code, offset=offset)
    return NF4Weight(
        packed=packed, absmax=absmax, blocksize=blocksize, shape=tuple(w.shape), dtype=w.dtype, code=code, **kwargs
    )


def check_absmax_args(
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    n_blocks: int,
    where: str,
) -> None:
    """ValueError/TypeError naming the argument unless (absmax, nested_absmax, nested_code, offset) is one of the
    two forms the kernels read: fp32 absmax [n_blocks] and three Nones, or uint8 absmax codes [n_blocks] with
    fp32 nested_absmax [ceil(n_blocks / 256)], fp32 nested_code [256] and a one-element fp32 offset."""
    nested = (nested_absmax, nested_code, offset)
    if all(t is None for t in nested):
        if absmax.dtype != torch.float32 or absmax.numel() != n_blocks:
            raise ValueError(
                f"{where}: absmax must be float32 with {n_blocks} entries (one per block), got {absmax.dtype} with "
                f"{absmax.numel()}; double-quantized uint8 codes need nested_absmax, nested_code and offset"
            )
        return
    for name, t in zip(("nested_absmax", "nested_code", "offset"), nested):
        if t is None:
            raise ValueError(f"{where}: {name} is None but other nested statistics are given (pass all three)")
        if t.dtype != torch.float32:
            raise TypeError(f"{where}: {name} must be float32, got {t.dtype}")
    if absmax.dtype != torch.uint8 or absmax.numel() != n_blocks:
        raise ValueError(
            f"{where}: absmax must be uint8 codes with {n_blocks} entries when double-quantized, got {absmax.dtype} "
            f"with {absmax.numel()}"
        )
    n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
    if nested_absmax.numel() != n_nested:
        raise ValueError(
            f"{where}: nested_absmax must hold ceil({n_blocks}/{NESTED_BLOCKSIZE}) = {n_nested} values, got "
            f"{nested_absmax.numel()}"
        )
    if nested_code.numel() != 256:
        raise ValueError(f"{where}: nested_code must be the 256-entry dynamic map, got {nested_code.numel()} values")
    if offset.numel() != 1:
        raise ValueError(f"{where}: offset must hold one value, got {offset.numel()}")


def decode_absmax(
    absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None, offset: Tensor | None
) -> Tensor:
    """Per-block absmax: `absmax` itself, or, double-quantized, nested_code[code] * nested_absmax[block // 256]
    + offset, rounded as bitsandbytes does (one fp32 product, then one fp32 sum; the kernels round the same)."""
    if nested_absmax is None:
        return absmax
    n = absmax.numel()
    vals = nested_code[absmax.reshape(-1).long()]
    pad = (-n) % NESTED_BLOCKSIZE
    vals = torch.nn.functional.pad(vals, (0, pad)).view(-1, NESTED_BLOCKSIZE) * nested_absmax.view(-1, 1)
    return vals.reshape(-1)[:n] + offset.reshape(()).to(vals.dtype)


def dequantize_packed(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    dtype: torch.dtype,
) -> Tensor:
    """Dequantize flat-block NF4 bytes to a [n, k] tensor (materializes the weight: reference only). absmax is
    fp32 (nested_* None) or double-quantized uint8 codes with their nested statistics (`decode_absmax`)."""
    absmax = decode_absmax(absmax, nested_absmax, nested_code, offset)
    flat = packed.reshape(-1)
    codes = torch.stack(((flat >> 4), (flat & 0xF)), dim=1).reshape(-1)[: n * k].long()
    vals = code[codes]
    pad = (-(n * k)) % blocksize
    vals = torch.nn.functional.pad(vals, (0, pad)).view(-1, blocksize) * absmax.view(-1, 1)
    return vals.reshape(-1)[: n * k].view(n, k).to(dtype)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full weight in `dtype` (default: the original dtype). Reference path: materializes the weight."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q must be an NF4Weight, got {type(q).__name__}")
    n, k = q.shape
    return dequantize_packed(q.packed, q.absmax, q.code, *q.absmax_args()[1:], n, k, q.blocksize, dtype or q.dtype)


__all__ = [
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "dequantize_packed",
    "decode_absmax",
    "check_absmax_args",
    "nf4_code",
    "NF4_CODE",
    "NESTED_BLOCKSIZE",
]
