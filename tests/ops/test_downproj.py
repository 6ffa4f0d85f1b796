"""downproj: every backend against a float64 reference (forward, dW, db, grad_h), int8 storage, op checks."""

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ladder_kernels.ops.downproj import downproj, quantize_rows_int8
from tests.helpers import DEVICE, poison_, rel_err, require_backend

dp_module = importlib.import_module("ladder_kernels.ops.downproj")  # the module, not a re-export

BACKENDS = ["torch", "cpu", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def params(d: int, D: int, w_dtype=torch.float32, bias=True):
    w = (torch.randn(d, D) / D**0.5).to(w_dtype).requires_grad_()
    b = torch.randn(d).to(w_dtype).requires_grad_() if bias else None
    return w, b


def reference(h, w, b, g):
    """float64 z, dW, db for upstream gradient g."""
    h64, g64 = h.double().reshape(-1, w.shape[1]), g.double().reshape(-1, w.shape[0])
    z = h64 @ w.double().t() + (b.double() if b is not None else 0)
    return z.reshape(g.shape), g64.t() @ h64, g64.sum(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,D,d", [((1,), 45, 11), ((7,), 100, 24), ((37,), 33, 5), ((3, 43), 70, 17)])
def test_forward_and_grads_bf16_storage(backend, dtype, lead, D, d):
    require_backend(backend)
    h = torch.randn(*lead, D).to(dtype)
    w, b = params(d, D)  # fp32 master weights, h in a 16-bit dtype: the Ladder case
    z = downproj(h, w, b, storage="bf16", backend=backend)
    g = torch.randn_like(z)
    gw, gb = torch.autograd.grad(z, (w, b), g)
    z_ref, gw_ref, gb_ref = reference(h, w, b, g)
    assert z.dtype == dtype and z.shape == (*lead, d)
    assert gw.dtype == w.dtype and gb.dtype == b.dtype
    assert rel_err(z, z_ref) < TOL[dtype]
    # fp32 h is kept as a bf16 copy: dW then carries one bf16 rounding of h.
    assert rel_err(gw, gw_ref) < (1e-2 if dtype == torch.float32 else TOL[dtype])
    assert rel_err(gb, gb_ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,D,d", [(1, 45, 11), (37, 100, 24), (129, 77, 9)])
def test_int8_storage_grads_close_to_bf16_storage(backend, dtype, M, D, d):
    require_backend(backend)
    h = torch.randn(M, D).to(dtype)
    w, b = params(d, D, w_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    z8 = downproj(h, w, b, storage="int8", backend=backend)
    z16 = downproj(h, w, b, storage="bf16", backend=backend)
    g = torch.randn_like(z8)
    gw8, gb8 = torch.autograd.grad(z8, (w, b), g)
    gw16, gb16 = torch.autograd.grad(z16, (w, b), g)
    assert torch.equal(z8, z16)  # the storage only changes what is kept, not the output
    assert gw8.dtype == w.dtype
    assert rel_err(gw8, gw16) < 1e-2
    assert rel_err(gb8, gb16) < 1e-5
    _, gw_ref, _ = reference(h, w, b, g)
    assert rel_err(gw8, gw_ref) < 1.5e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_saved_rows_match_reference_quantizer(backend):
    require_backend(backend)
    h = torch.randn(37, 100) * torch.rand(37, 1) * 5
    h[3] = 0  # an all-zero row: scale 0, codes 0, no NaN
    w, b = params(24, 100)
    _, q, scale = torch.ops.ladder.downproj(h, w.detach(), b.detach(), "int8", backend)
    q_ref, scale_ref = quantize_rows_int8(h)
    assert q.dtype == torch.int8 and q.shape == (37, 100) and scale.shape == (37,)
    assert torch.allclose(scale, scale_ref, rtol=1e-6, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # rounding ties may differ by one code
    assert (q[3] == 0).all() and scale[3] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_grad_h_when_h_requires_grad(backend, storage):
    require_backend(backend)
    h = torch.randn(2, 7, 45, requires_grad=True)
    w, b = params(11, 45)
    z = downproj(h, w, b, storage=storage, backend=backend)
    g = torch.randn_like(z)
    gh, gw = torch.autograd.grad(z, (h, w), g)
    assert rel_err(gh, g.double() @ w.double()) < 1e-5
    _, gw_ref, _ = reference(h, w, b, g)
    assert rel_err(gw, gw_ref) < 1.5e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_non_contiguous_h(backend):
    require_backend(backend)
    h = torch.randn(45, 13).t()  # [13, 45], non-contiguous rows
    w, _ = params(11, 45, bias=False)
    z = downproj(h, w, None, backend=backend)
    g = torch.randn_like(z)
    (gw,) = torch.autograd.grad(z, (w,), g)
    z_ref, gw_ref, _ = reference(h, w, None, g)
    assert rel_err(z, z_ref) < 1e-5 and rel_err(gw, gw_ref) < 1e-2


@pytest.mark.gpu
def test_triton_kernels_write_every_output_element():
    require_backend("triton")
    from ladder_kernels.kernels.triton import downproj as tk
    from ladder_kernels.ops.downproj import reference_backward, reference_forward

    # the launchers take the tensors as they are: CUDA ones where a GPU compiles the kernels, CPU ones under
    # the interpreter
    h = torch.randn(37, 100, dtype=torch.bfloat16, device=DEVICE)
    w, b = (t.detach().to(DEVICE) for t in params(24, 100))
    z_ref, q_ref, s_ref = reference_forward(h, w, b, "int8")
    z, q, s = poison_(torch.empty_like(z_ref)), torch.full_like(q_ref, -128), poison_(torch.empty_like(s_ref))
    tk.launch_forward(h, w, b, z, q, s)  # -128 is never a code: clamped to [-127, 127]
    assert not z.isnan().any() and not s.isnan().any() and (q != -128).all()
    assert rel_err(z, z_ref) < TOL[torch.bfloat16]
    g = torch.randn(37, 24, dtype=torch.bfloat16, device=DEVICE)
    gw_ref, gb_ref = reference_backward(g, q_ref, s_ref, torch.float32, torch.float32)
    gw, gb = poison_(torch.empty_like(gw_ref)), poison_(torch.empty_like(gb_ref))
    tk.launch_backward(g, q, s, gw, gb)
    assert rel_err(gw, gw_ref) < 1e-2 and rel_err(gb, gb_ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_opcheck(backend, storage):
    require_backend(backend)
    w, b = params(11, 45)
    h = torch.randn(7, 45, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.ladder.downproj.default, (h, w, b, storage, backend))
    g = torch.randn(7, 11, dtype=torch.bfloat16)
    _, q, s = torch.ops.ladder.downproj(h, w.detach(), b.detach(), storage, backend)
    saved = q if storage == "int8" else h
    torch.library.opcheck(
        torch.ops.ladder.downproj_backward.default, (g, saved, s, torch.float32, torch.float32, backend)
    )


@pytest.mark.parametrize("storage,saved_dtype", [("bf16", torch.bfloat16), ("int8", torch.int8)])
def test_fake_tensor_shapes(storage, saved_dtype):
    with FakeTensorMode():
        h = torch.empty(2, 5, 64, dtype=torch.float32)
        w = torch.empty(16, 64, requires_grad=True)
        z, saved, scale = torch.ops.ladder.downproj(h, w, None, storage, "torch")
        assert z.shape == (2, 5, 16) and z.dtype == torch.float32
        assert saved.shape == (10, 64) and saved.dtype == saved_dtype
        assert scale.shape == ((10,) if storage == "int8" else (0,))
        out = downproj(h, w, storage=storage, backend="torch")
        (gw,) = torch.autograd.grad(out.sum(), (w,))
        assert gw.shape == (16, 64) and gw.dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    h, (w, b) = torch.randn(3, 8), params(4, 8)
    with pytest.raises(ValueError, match="storage"):
        downproj(h, w, b, storage="fp8")
    with pytest.raises(ValueError, match="h's last dim"):
        downproj(torch.randn(3, 9), w, b)
    with pytest.raises(TypeError, match="h must be"):
        downproj(torch.randint(0, 5, (3, 8)), w, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        downproj(h, w, torch.randn(5))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        downproj(h, torch.randn(8), None)
    with pytest.raises(TypeError, match="weight must be"):
        downproj(h, w.detach().int(), None)
    with pytest.raises(ValueError, match="weight is on meta"):
        downproj(h, torch.empty(4, 8, device="meta"), None)
    with pytest.raises(ValueError, match="backend"):
        downproj(h, w, b, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_kept_when_no_gradient_needs_h(backend, monkeypatch):
    """Under no_grad, or with weight and bias frozen, the op is asked to keep nothing (no quantization pass)."""
    require_backend(backend)
    h = torch.randn(37, 45, dtype=torch.bfloat16)
    w, b = params(11, 45)
    seen = []
    real_kernel = dp_module.kernel

    def spying_kernel(name, backend_):
        impl = real_kernel(name, backend_)
        if name != "downproj":
            return impl
        assert backend_ == backend
        return lambda h2d, weight, bias, storage: seen.append(storage) or impl(h2d, weight, bias, storage)

    monkeypatch.setattr(dp_module, "kernel", spying_kernel)
    z_train = downproj(h, w, b, storage="int8", backend=backend)
    with torch.no_grad():
        z_eval = downproj(h, w, b, storage="int8", backend=backend)
    z_frozen = downproj(h, w.detach(), b.detach(), storage="int8", backend=backend)
    assert seen == ["int8", "none", "none"]
    assert torch.equal(z_eval, z_train) and torch.equal(z_frozen, z_train)
    _, saved, scale = torch.ops.ladder.downproj(h, w.detach(), b.detach(), "none", backend)
    assert saved.numel() == 0 and scale.numel() == 0


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_call_without_autograd_skips_the_op_dispatch_and_agrees(backend, monkeypatch):
    """Without autograd (generation: one call per side layer per token) the kernel is called directly: the same
    values; with trainable weights, or a tensor subclass such as a fake tensor, the custom op still runs."""
    require_backend(backend)
    h = torch.randn(3, 45)
    w, b = params(11, 45)
    calls = []
    real_op = dp_module._downproj_op
    monkeypatch.setattr(dp_module, "_downproj_op", lambda *a: calls.append(1) or real_op(*a))
    with torch.no_grad():
        direct = downproj(h, w, b, backend=backend)
    assert calls == [] and direct.grad_fn is None
    trained = downproj(h, w, b, backend=backend)
    assert calls == [1] and trained.grad_fn is not None and torch.equal(trained.detach(), direct)
    assert rel_err(direct, reference(h, w, b, torch.ones(3, 11))[0]) < 1e-5
    with FakeTensorMode() as mode, torch.no_grad():
        fake = downproj(mode.from_tensor(h), mode.from_tensor(w), None, backend=backend)
    assert calls == [1, 1] and fake.shape == (3, 11)
