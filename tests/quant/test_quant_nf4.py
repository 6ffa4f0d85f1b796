"""NF4 format: byte/bit equality with bitsandbytes, round trips, bad input."""

import pytest
import torch

bnbF = pytest.importorskip("bitsandbytes.functional")

from ladder_kernels.quant import NF4_CODE, NF4Weight, dequantize_nf4, quantize_nf4  # noqa: E402
from ladder_kernels.quant.nf4 import _dynamic_map_cpu  # noqa: E402

SHAPES = [(64, 128), (37, 100), (300, 77), (1, 33), (129, 257)]


def test_tables_equal_bitsandbytes_floats():
    assert torch.equal(torch.tensor(NF4_CODE), bnbF.get_4bit_type("nf4", device="cpu").float())
    assert torch.equal(_dynamic_map_cpu(), bnbF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_equal_bitsandbytes(shape, blocksize, dtype):
    w = (torch.randn(*shape) * torch.rand(shape[0], 1) * 3).to(dtype)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    q = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax)
    assert q.shape == shape and q.dtype == dtype


@pytest.mark.parametrize("shape", [(64, 128), (300, 77), (512, 640)])
def test_double_quant_equal_bitsandbytes(shape):
    w = torch.randn(*shape)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.nested_absmax, state.state2.absmax)
    assert torch.allclose(q.offset, state.offset)
    ref = bnbF.dequantize_4bit(packed, state)
    out = dequantize_nf4(q)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.parametrize("shape", [(64, 128), (48, 192)])
def test_dequant_bit_identical_without_double_quant(shape):
    # shapes whose rows hold whole blocks: bitsandbytes' CPU dequantize is right there (see the next test)
    w = torch.randn(*shape)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(dequantize_nf4(quantize_nf4(w, 64, double_quant=False)), bnbF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", [(37, 100), (5, 33), (129, 257)])
def test_ragged_rows_follow_flat_block_definition(shape):
    """Blocks straddle rows when in_features % blocksize != 0: element i uses absmax[i // blocksize]."""
    w = torch.randn(*shape)
    q = quantize_nf4(w, 64, double_quant=False)
    flat = q.packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 0xF), 1).reshape(-1)[: w.numel()].long()
    idx = torch.arange(w.numel())
    expected = (torch.tensor(NF4_CODE)[codes] * q.absmax[idx // 64]).reshape(shape)
    assert torch.equal(dequantize_nf4(q), expected)
    # and the quantization error stays within half a code step of each block's absmax
    step = torch.diff(torch.tensor(NF4_CODE)).max() / 2
    assert ((dequantize_nf4(q) - w).abs().reshape(-1) <= step * q.absmax[idx // 64] + 1e-6).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_round_trip(double_quant):
    w = torch.randn(96, 192)  # whole blocks per row: bitsandbytes dequantizes ragged rows wrongly
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    q = NF4Weight.from_bnb(packed, state)
    assert q.double_quant == double_quant
    torch.testing.assert_close(dequantize_nf4(q), bnbF.dequantize_4bit(packed, state), rtol=1e-6, atol=1e-7)
    packed2, state2 = quantize_nf4(w, 64, double_quant).to_bnb()
    assert torch.equal(packed2, packed)
    torch.testing.assert_close(bnbF.dequantize_4bit(packed2, state2), bnbF.dequantize_4bit(packed, state))


def test_from_bnb_accepts_other_quant_storage():
    w = torch.randn(64, 128)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    q = NF4Weight.from_bnb(packed, state)
    assert q.packed.dtype == torch.uint8
    assert torch.equal(dequantize_nf4(q), dequantize_nf4(quantize_nf4(w, 64, double_quant=False)))


def test_bad_input():
    with pytest.raises(TypeError, match="floating"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_nf4(torch.randn(64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        w = torch.randn(4, 64)
        w[1, 3] = float("inf")
        quantize_nf4(w)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(4, 64), blocksize=8192)
    q = quantize_nf4(torch.randn(8, 64), double_quant=False)
    with pytest.raises(ValueError, match="absmax"):
        NF4Weight(packed=q.packed, absmax=q.absmax[:-1], blocksize=64, shape=q.shape, dtype=q.dtype, code=q.code)
    with pytest.raises(ValueError, match="packed"):
        NF4Weight(packed=q.packed[:-1], absmax=q.absmax, blocksize=64, shape=q.shape, dtype=q.dtype, code=q.code)
    with pytest.raises(TypeError, match="NF4Weight"):
        dequantize_nf4(torch.randn(3, 3))
