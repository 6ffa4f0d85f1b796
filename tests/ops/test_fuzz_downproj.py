"""Property-based tests (hypothesis) for the ladder down-projection: random shapes, leading dims, strides,
dtypes, storages and backends against a float64 reference (output, dW, db, dh); malformed arguments must raise
a clear error naming the argument, never return an answer. FUZZ_EXAMPLES=600 runs a longer search."""

import os

import hypothesis  # noqa: F401
import pytest
import torch
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ladder_kernels.ops.downproj import downproj  # noqa: E402
from tests.helpers import DEVICE, require_backend  # noqa: E402

FAST = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# output tolerance per h dtype; dW also carries the stored copy of h (bf16: 2^-8 relative, int8: per-row 1/254)
OUT_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DW_TOL = {"bf16": 1e-2, "int8": 2e-2}


@pytest.mark.gpu
@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    lead=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    D=st.integers(1, 130),
    d=st.integers(1, 40),
    dtype=st.sampled_from(list(OUT_TOL)),
    storage=st.sampled_from(["bf16", "int8"]),
    backend=st.sampled_from(["torch", "cpu", "triton"]),
    transposed=st.booleans(),
    with_bias=st.booleans(),
    h_grad=st.booleans(),
    scale=st.sampled_from([1e-2, 1.0, 50.0]),
)
def test_downproj_matches_float64_reference(
    seed, lead, D, d, dtype, storage, backend, transposed, with_bias, h_grad, scale
):
    require_backend(backend)
    # hypothesis draws the backend, so conftest's CUDA default device (for parametrized backend="triton") does
    # not apply: the inputs are drawn on CPU and moved where the backend runs (CUDA on a GPU machine).
    device = DEVICE if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(seed)
    rows = 1
    for n in lead:
        rows *= n
    if transposed:  # non-contiguous h: a view of a transposed [D, rows] buffer
        h = (torch.randn(D, rows, generator=g) * scale).t().reshape(*lead, D)
        assert D == 1 or rows == 1 or not h.is_contiguous()
    else:
        h = torch.randn(*lead, D, generator=g) * scale
    h = h.to(device=device, dtype=dtype).requires_grad_(h_grad)
    w = (torch.randn(d, D, generator=g) / D**0.5).to(device).requires_grad_()
    b = torch.randn(d, generator=g).to(device).requires_grad_() if with_bias else None

    z = downproj(h, w, b, storage=storage, backend=backend)
    assert z.device == h.device
    # the reference sees the same rounded upstream gradient; it is computed on CPU in float64
    up = torch.randn(z.shape, generator=g).to(device=device, dtype=z.dtype)
    inputs = [w] + ([b] if with_bias else []) + ([h] if h_grad else [])
    grads = [t.cpu() for t in torch.autograd.grad(z, inputs, up)]
    z, up = z.cpu(), up.cpu()

    h64, up64, w64 = h.detach().cpu().double().reshape(-1, D), up.double().reshape(-1, d), w.detach().cpu().double()
    assert z.shape == (*lead, d) and z.dtype == dtype
    # error relative to the sum of |terms| (not to the result, which cancellation can make arbitrarily small)
    b64 = b.detach().cpu().double() if with_bias else torch.zeros(d, dtype=torch.float64)
    assert bounded_err(z.reshape(-1, d), h64 @ w64.t() + b64, h64.abs() @ w64.abs().t() + b64.abs()) < OUT_TOL[dtype]
    assert bounded_err(grads[0], up64.t() @ h64, up64.abs().t() @ h64.abs()) < max(DW_TOL[storage], OUT_TOL[dtype])
    if with_bias:
        assert bounded_err(grads[1], up64.sum(0), up64.abs().sum(0)) < 1e-5
    if h_grad:
        assert bounded_err(grads[-1].reshape(-1, D), up64 @ w64, up64.abs() @ w64.abs()) < OUT_TOL[dtype]


def bounded_err(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor) -> float:
    """‖out − ref‖ / ‖Σ|terms|‖: the relative error a sum can promise whatever its cancellation."""
    return float((out.detach().double() - ref).norm() / magnitude.norm().clamp_min(1e-300))


@settings(max_examples=40, deadline=None)
@given(
    D=st.integers(2, 40),
    d=st.integers(1, 10),
    fault=st.sampled_from(["width", "bias_len", "w_rank", "storage", "dtype"]),
)
def test_malformed_arguments_raise_clear_errors(D, d, fault):
    h, w, b, storage = torch.randn(3, D), torch.randn(d, D), torch.randn(d), "bf16"
    if fault == "width":
        w = torch.randn(d, D - 1)
    elif fault == "bias_len":
        b = torch.randn(d + 1)
    elif fault == "w_rank":
        w = torch.randn(d, D, 1)
    elif fault == "storage":
        storage = "fp8"
    else:
        h = h.to(torch.int32)
    with pytest.raises((ValueError, TypeError)) as info:
        downproj(h, w, b, storage=storage, backend="torch")
    assert any(name in str(info.value) for name in ("h", "weight", "bias", "storage")), str(info.value)
