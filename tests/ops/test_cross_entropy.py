"""fused_linear_cross_entropy: every backend against a float64 reference (loss and grad_hidden), chunking,
ignore_index, softcap, no_grad, op checks, fake shapes, peak memory, bad inputs."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from ladder_kernels.backends import backend_info, kernel
from ladder_kernels.ops.cross_entropy import (
    chunked_linear_cross_entropy,
    fused_linear_cross_entropy,
    reference_ce_rows_,
)
from ladder_kernels.planning.memory import PeakMemoryTracker
from tests.helpers import rel_err, require_backend

ce_module = importlib.import_module("ladder_kernels.ops.cross_entropy")  # the module, not a re-export

BACKENDS = ["torch", "cpu", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_inputs(T, D, V, dtype, ignore_every=4):
    hidden = torch.randn(T, D).to(dtype).requires_grad_()
    weight = (torch.randn(V, D) * 2 / D**0.5).to(dtype)  # logits of a few units: a non-trivial softmax
    labels = torch.randint(0, V, (T,))
    labels[::ignore_every] = -100
    return hidden, weight, labels


def reference(hidden, weight, labels, bias=None, softcap=None, reduction="mean", grad_out=None):
    """float64 loss and d loss / d hidden of the same inputs."""
    h = hidden.detach().double().requires_grad_()
    logits = h @ weight.double().t() + (bias.double() if bias is not None else 0)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)
    (grad,) = torch.autograd.grad(loss, h, grad_out.double() if grad_out is not None else None)
    return loss.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "T,D,V,chunk", [(1, 24, 1000, 1024), (7, 24, 3001, 3), (37, 40, 1000, 16), (129, 24, 3001, 50)]
)
def test_loss_and_grad_match_float64(backend, dtype, T, D, V, chunk):
    require_backend(backend)
    hidden, weight, labels = make_inputs(T, D, V, dtype)
    if T == 1:
        labels[0] = 5  # the single row must count
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, backend=backend)
    (grad,) = torch.autograd.grad(loss, hidden)
    loss_ref, grad_ref = reference(hidden, weight, labels)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype and grad.shape == hidden.shape
    assert rel_err(loss, loss_ref) < TOL[dtype]
    assert rel_err(grad, grad_ref) < TOL[dtype]
    assert (grad[labels == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_bias_softcap_and_leading_dims(backend, reduction):
    require_backend(backend)
    hidden = torch.randn(3, 13, 40, requires_grad=True)
    weight, bias = torch.randn(1000, 40) / 3, torch.randn(1000)
    labels = torch.randint(0, 1000, (3, 13))
    labels[1, 2:5] = -100
    loss = fused_linear_cross_entropy(
        hidden, weight, labels, bias, chunk_size=8, reduction=reduction, softcap=4.0, backend=backend
    )
    grad_out = torch.randn_like(loss)
    (grad,) = torch.autograd.grad(loss, hidden, grad_out)
    loss_ref, grad_ref = reference(
        hidden.reshape(-1, 40),
        weight,
        labels.reshape(-1),
        bias,
        4.0,
        reduction,
        grad_out.reshape(-1) if reduction == "none" else grad_out,
    )
    assert loss.shape == (labels.shape if reduction == "none" else ())
    assert rel_err(loss.reshape(-1), loss_ref.reshape(-1)) < 1e-5
    assert rel_err(grad.reshape(-1, 40), grad_ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_hidden_through_bf16_lm_head(backend):
    """A side network in fp32 feeding a bf16 lm_head: matmuls in bf16, grad back in hidden's dtype."""
    require_backend(backend)
    hidden, weight, labels = make_inputs(37, 40, 1000, torch.float32)
    weight = weight.bfloat16()
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=16, backend=backend)
    (grad,) = torch.autograd.grad(loss, hidden)
    loss_ref, grad_ref = reference(hidden, weight, labels)
    assert grad.dtype == torch.float32
    assert rel_err(loss, loss_ref) < TOL[torch.bfloat16] and rel_err(grad, grad_ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_kernel_in_place_matches_reference(backend):
    """The backend's row-wise kernel alone, on a fresh logits chunk: loss and the gradient it writes in place."""
    require_backend(backend)
    logits = torch.randn(9, 3001) * 3
    labels = torch.randint(0, 3001, (9,))
    labels[4] = -100
    expected = logits.clone()
    loss_ref = reference_ce_rows_(expected, labels, -100, 0.0, True)
    got = logits.clone()
    loss = kernel("cross_entropy_rows", backend)(got, labels, -100, 0.0, True)
    assert rel_err(loss, loss_ref) < 1e-6 and rel_err(got, expected) < 1e-5
    assert (got[4] == 0).all() and loss[4] == 0
    untouched = logits.clone()
    kernel("cross_entropy_rows", backend)(untouched, labels, -100, 0.0, False)
    assert torch.equal(untouched, logits)  # without grad the logits are left as they were


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,scale", [(5, 3.0), (13, 3.0), (3001, 3.0), (1003, 40.0)])
def test_row_kernel_matches_float64_over_dtypes_and_logit_ranges(backend, dtype, V, scale):
    """Vocabularies shorter than and not a multiple of a vector, and logits spread so far (scale 40) that most
    exponentials underflow fp32: loss and gradient against float64 softmax - onehot. The gradient is written over
    the logits, so an entry the kernel misses keeps a logit and fails the comparison."""
    require_backend(backend)
    logits = (torch.randn(6, V, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, (6,))
    labels[3] = -100
    z = logits.double()
    loss_ref = torch.logsumexp(z, 1) - z.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    grad_ref = torch.softmax(z, 1) - F.one_hot(labels.clamp(min=0), V).double()
    loss_ref[3], grad_ref[3] = 0, 0
    got = logits.clone()
    loss = kernel("cross_entropy_rows", backend)(got, labels, -100, 0.0, True)
    assert loss.dtype == torch.float32 and rel_err(loss, loss_ref) < 1e-6
    assert got.dtype == dtype and rel_err(got, grad_ref) < {torch.float32: 1e-6}.get(dtype, 5e-3)
    assert (got[3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_labels_ignored_gives_zero_loss_and_grad(backend):
    require_backend(backend)
    hidden, weight, _ = make_inputs(7, 24, 1000, torch.float32)
    labels = torch.full((7,), -1, dtype=torch.long)
    loss = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-1, chunk_size=4, backend=backend)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert loss.item() == 0 and not loss.isnan() and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_skips_gradient_work(backend, monkeypatch):
    require_backend(backend)
    hidden, weight, labels = make_inputs(37, 24, 1000, torch.float32)
    seen = []
    real_kernel = ce_module.kernel

    def spying_kernel(name, backend_):
        rows = real_kernel(name, backend_)
        assert name == "cross_entropy_rows" and backend_ == backend
        return lambda logits, lab, ignore, cap, compute_grad: (
            seen.append(compute_grad) or rows(logits, lab, ignore, cap, compute_grad)
        )

    monkeypatch.setattr(ce_module, "kernel", spying_kernel)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=16, backend=backend)
    loss_frozen = fused_linear_cross_entropy(hidden.detach(), weight, labels, chunk_size=16, backend=backend)
    assert seen == [False] * 6  # 3 chunks per call, none asked for a gradient
    assert not loss.requires_grad and not loss_frozen.requires_grad
    loss_ref = reference(hidden, weight, labels)[0]
    assert rel_err(loss, loss_ref) < 1e-5 and rel_err(loss_frozen, loss_ref) < 1e-5
    _, grad_hidden = torch.ops.ladder.fused_linear_cross_entropy(
        hidden.detach(), weight, labels, None, -100, 16, None, False, backend
    )
    assert grad_hidden.shape == (0, 24)  # nothing kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    require_backend(backend)
    hidden, weight, labels = make_inputs(7, 24, 1000, torch.float32)
    for h, compute_grad in ((hidden, True), (hidden.detach(), False)):  # compute_grad=False: no grad wanted
        torch.library.opcheck(
            torch.ops.ladder.fused_linear_cross_entropy.default,
            (h, weight, labels, torch.randn(1000), -100, 3, 30.0, compute_grad, backend),
        )


def test_fake_tensor_shapes():
    with FakeTensorMode():
        hidden = torch.empty(4, 9, 64, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.empty(32000, 64, dtype=torch.bfloat16)
        labels = torch.empty(4, 9, dtype=torch.long)
        losses, grad_hidden = torch.ops.ladder.fused_linear_cross_entropy(
            hidden.reshape(36, 64), weight, labels.reshape(36), None, -100, 8, None, True, "torch"
        )
        assert losses.shape == (36,) and losses.dtype == torch.float32
        assert grad_hidden.shape == (36, 64) and grad_hidden.dtype == torch.bfloat16
        assert fused_linear_cross_entropy(hidden, weight, labels, reduction="none", backend="torch").shape == (4, 9)


def test_peak_memory_far_below_full_logits():
    """T=2048, V=32000: the chunked path never holds more than a [chunk, V] buffer, far below T*V*4 bytes."""
    backend = "cpu" if backend_info()["cpu"] else "torch"
    T, D, V, chunk = 2048, 16, 32000, 128
    hidden = torch.randn(T, D)
    weight = torch.randn(V, D) / 4
    labels = torch.randint(0, V, (T,))
    full_logits_bytes = T * V * 4
    # The op is one dispatcher call (a mode cannot see inside it), so track its body directly.
    with PeakMemoryTracker() as mem:
        losses, grad_hidden = chunked_linear_cross_entropy(
            hidden, weight, labels, None, -100, chunk, None, True, backend
        )
    assert mem.peak_bytes >= chunk * V * 4  # the tracker does see the logits chunk...
    assert mem.peak_bytes < full_logits_bytes / 4  # ...and nothing of the full logits' size
    assert grad_hidden.shape == (T, D) and losses.isfinite().all()


def test_bad_inputs_raise_clear_errors():
    hidden, weight, labels = make_inputs(5, 8, 50, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_cross_entropy(hidden, weight, labels, softcap=-1.0)
    with pytest.raises(ValueError, match="hidden's last dim"):
        fused_linear_cross_entropy(torch.randn(5, 9), weight, labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        fused_linear_cross_entropy(hidden, weight, labels[:4])
    with pytest.raises(TypeError, match="labels must be an integer"):
        fused_linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(TypeError, match="hidden must be"):
        fused_linear_cross_entropy(labels[:, None].expand(5, 8), weight, labels)
    with pytest.raises(ValueError, match="weight must be frozen"):
        fused_linear_cross_entropy(hidden, weight.clone().requires_grad_(), labels)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        fused_linear_cross_entropy(hidden, weight, torch.full((5,), 50), backend="torch")
    with pytest.raises(ValueError, match="labels is on meta"):
        fused_linear_cross_entropy(hidden, weight, torch.empty(5, dtype=torch.long, device="meta"))
