"""nf4_matmul on every backend against a float64 reference: forward, gradients, odd shapes, dtypes."""

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ladder_kernels import NF4Weight, nf4_matmul, quantize_nf4
from ladder_kernels.defaults import POISON_OUTPUTS_ENV
from ladder_kernels.ops.nf4_matmul import PreparedNF4Matmul
from ladder_kernels.quant import dequantize_nf4
from tests.helpers import rel_err, require_backend

nf4_matmul_module = importlib.import_module("ladder_kernels.ops.nf4_matmul")  # the package re-exports the function

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 1.5e-2}
BACKENDS = ["torch", "cpu", "triton"]


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Allocations made through torch.empty/empty_like (how the Python launchers allocate outputs) and the C++
    ops' outputs (POISON_OUTPUTS_ENV) start as NaN, so an element a kernel forgets to write cannot pass by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    monkeypatch.setenv(POISON_OUTPUTS_ENV, "1")  # and the C++ ops' own outputs


def reference(x, q, bias=None):
    out = x.double() @ dequantize_nf4(q, torch.float64).t()
    return out + bias.double() if bias is not None else out


def make_weight(n, k, blocksize=64, double_quant=True):
    w = torch.randn(n, k) * (1 + torch.rand(n, 1))  # rows of different scales
    return quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)


# Triton under the interpreter is slow: it gets the odd shapes, the others get bigger ones too.
# K not a multiple of the blocksize (blocks straddle rows), an odd number of weights, M across tile edges.
SHAPES = [(1, 33, 100), (7, 130, 72), (5, 37, 97), (37, 64, 256), (300, 96, 160)]


def shapes_for(backend):
    return SHAPES[:4] if backend == "triton" else SHAPES


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_float64_reference(backend, dtype, poisoned_empty):
    require_backend(backend)
    for m, n, k in shapes_for(backend):
        for blocksize, dq in ((64, True), (128, False)):
            q = make_weight(n, k, blocksize, dq)
            x = torch.randn(m, k).to(dtype)
            bias = torch.randn(n).to(dtype)
            out = nf4_matmul(x, q, bias, backend=backend)
            assert out.dtype == dtype and out.shape == (m, n)
            assert rel_err(out, reference(x, q, bias)) <= TOL[dtype], (m, n, k, blocksize)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_float64_reference(backend, dtype, poisoned_empty):
    require_backend(backend)
    for m, n, k in shapes_for(backend):
        q = make_weight(n, k)
        x = torch.randn(m, k).to(dtype).requires_grad_()
        bias = torch.randn(n).to(dtype).requires_grad_()
        grad_out = torch.randn(m, n).to(dtype)
        nf4_matmul(x, q, bias, backend=backend).backward(grad_out)
        w64 = dequantize_nf4(q, torch.float64)
        assert rel_err(x.grad, grad_out.double() @ w64) <= TOL[dtype]
        assert rel_err(bias.grad, grad_out.double().sum(0)) <= TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_non_contiguous_input(backend):
    require_backend(backend)
    q = make_weight(40, 96)
    base = torch.randn(3, 96, 5)
    x = base.transpose(1, 2)  # [3, 5, 96], non-contiguous
    assert not x.is_contiguous()
    x.requires_grad_()
    out = nf4_matmul(x, q, backend=backend)
    assert out.shape == (3, 5, 40)
    assert rel_err(out, reference(x, q)) <= 1e-5
    out.sum().backward()
    assert rel_err(x.grad, torch.ones(3, 5, 40, dtype=torch.float64) @ dequantize_nf4(q, torch.float64)) <= 1e-5


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backends_agree_with_torch_backend(backend):
    require_backend(backend)
    q = make_weight(72, 200)
    x = torch.randn(19, 200)
    assert rel_err(nf4_matmul(x, q, backend=backend), nf4_matmul(x, q, backend="torch")) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [True, False])
def test_opcheck(backend, double_quant):
    require_backend(backend)
    q = make_weight(24, 80, double_quant=double_quant)
    stats = (q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset)
    args = (torch.randn(5, 80, requires_grad=True), q.packed, *stats, 24, 80, 64, torch.randn(24), backend)
    torch.library.opcheck(torch.ops.ladder.nf4_matmul.default, args)
    grad_args = (torch.randn(5, 24), q.packed, *stats, 24, 80, 64, backend)
    torch.library.opcheck(torch.ops.ladder.nf4_matmul_grad_input.default, grad_args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nested_absmax_equals_cached_fp32_absmax(backend, dtype):
    """Reading the double-quantized statistics inside the kernel gives what decoding them beforehand gives: the
    same fp32 absmax (one product, one sum, as bitsandbytes rounds it), hence the same outputs."""
    require_backend(backend)
    q = make_weight(45, 160)  # 7200 weights: 113 blocks, a partial one at the end
    assert q.double_quant and q.absmax.dtype == torch.uint8
    x = torch.randn(9, 160).to(dtype).requires_grad_()
    nested = nf4_matmul(x, q, backend=backend)
    cached = nf4_matmul(x, q, backend=backend, absmax=q.block_absmax())
    tol = 0.0 if backend != "triton" else 1e-6  # the interpreter's float sums may be ordered differently
    assert rel_err(nested, cached) <= tol
    assert rel_err(nested, reference(x, q)) <= TOL[dtype]
    (gx_nested,) = torch.autograd.grad(nested.sum(), x)
    (gx_cached,) = torch.autograd.grad(cached.sum(), x)
    assert rel_err(gx_nested, gx_cached) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitsandbytes_double_quantized_bytes(backend):
    """bitsandbytes' own quantize_4bit (compress_statistics: double quantization), read as it is stored."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    require_backend(backend)
    w = torch.randn(96, 192)  # whole blocks per row: bitsandbytes' CPU dequantize is right there
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = NF4Weight.from_bnb(packed, state)
    assert q.double_quant and q.absmax.dtype == torch.uint8
    w64 = bnbF.dequantize_4bit(packed, state).double()
    x = torch.randn(11, 192, requires_grad=True)
    out = nf4_matmul(x, q, backend=backend)
    assert rel_err(out, x.double() @ w64.t()) <= 1e-5
    g = torch.randn(11, 96)
    out.backward(g)
    assert rel_err(x.grad, g.double() @ w64) <= 1e-5


def test_fake_tensor_shapes():
    q = make_weight(48, 64)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 9, 64))
        out = nf4_matmul(x, q, backend="torch")
        assert out.shape == (2, 9, 48) and out.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_call_without_autograd_skips_the_op_dispatch_and_agrees(backend, monkeypatch):
    """Without autograd the kernel is called directly (the custom op's dispatch costs more than a decode-sized
    matmul): the same values, and with autograd the op (and its backward) still runs."""
    require_backend(backend)
    q, bias = make_weight(40, 96), torch.randn(40)
    x = torch.randn(3, 96, requires_grad=True)
    with_grad = nf4_matmul(x, q, bias, backend=backend)
    with torch.no_grad():
        without = nf4_matmul(x, q, bias, backend=backend)
    assert with_grad.grad_fn is not None and without.grad_fn is None
    assert torch.equal(with_grad.detach(), without)
    calls = []
    real_op = nf4_matmul_module._nf4_matmul_op
    monkeypatch.setattr(nf4_matmul_module, "_nf4_matmul_op", lambda *a: calls.append(1) or real_op(*a))
    nf4_matmul(x.detach(), q, bias, backend=backend)
    assert calls == []
    nf4_matmul(x, q, bias, backend=backend).sum().backward()
    assert calls == [1] and rel_err(x.grad, torch.ones(3, 40).double() @ dequantize_nf4(q, torch.float64)) < 1e-5


def test_weight_never_gets_gradient_and_is_unchanged():
    q = make_weight(16, 64)
    before = q.packed.clone()
    x = torch.randn(3, 64, requires_grad=True)
    nf4_matmul(x, q).sum().backward()
    assert not q.packed.requires_grad and torch.equal(q.packed, before)


def test_bad_input():
    q = make_weight(16, 64)
    with pytest.raises(ValueError, match="in_features 64"):
        nf4_matmul(torch.randn(3, 65), q)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        nf4_matmul(torch.ones(3, 64, dtype=torch.int64), q)
    with pytest.raises(ValueError, match="backend must be one of"):
        nf4_matmul(torch.randn(3, 64), q, backend="cuda-magic")
    with pytest.raises(ValueError, match="bias must have shape"):
        nf4_matmul(torch.randn(3, 64), q, bias=torch.randn(15))
    with pytest.raises(TypeError, match="NF4Weight"):
        nf4_matmul(torch.randn(3, 64), torch.randn(16, 64))
    meta_x = torch.randn(3, 64, device="meta")
    with pytest.raises(ValueError, match="meta"):
        nf4_matmul(meta_x, q)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_prepared_matmul_equals_nf4_matmul_on_every_path(backend):
    """PreparedNF4Matmul: the direct kernel call (no autograd, matching dtypes) and the fallback through
    nf4_matmul (autograd, a bias in another dtype, bad input) give nf4_matmul's results and errors."""
    require_backend(backend)
    q, bias = make_weight(40, 96), torch.randn(40)
    prepared = PreparedNF4Matmul(q, bias, backend)
    w64 = dequantize_nf4(q, torch.float64)
    x = torch.randn(2, 3, 96, requires_grad=True)
    with torch.no_grad():
        direct = prepared(x)
    assert torch.equal(direct, nf4_matmul(x.detach(), q, bias, backend))
    assert rel_err(direct, x.double() @ w64.t() + bias.double()) < 1e-5
    prepared(x).sum().backward()
    assert rel_err(x.grad, torch.ones(2, 3, 40).double() @ w64) < 1e-5
    xb = torch.randn(7, 96).bfloat16()  # bias fp32, x bf16: cast on the way, as nf4_matmul does
    assert torch.equal(prepared(xb), nf4_matmul(xb, q, bias, backend))
    with pytest.raises(ValueError, match="in_features 96"):
        prepared(torch.randn(3, 95))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        prepared(torch.randn(3, 96).double())
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(40,\)"):
        PreparedNF4Matmul(q, torch.randn(39))
