"""The C++ nf4_matmul kernels (csrc/nf4_matmul.cpp, csrc/nf4_avx2.cpp) on every code path this CPU runs (scalar,
avx2, avx512: forced with LADDER_KERNELS_CPU_ISA), against the float64 reference: forward and grad_input, nested
and plain absmax, odd shapes across the kernels' tile edges, strided inputs, outputs poisoned with NaN before the
kernel writes them (POISON_OUTPUTS_ENV), and the extra memory of a call."""

from __future__ import annotations

import pytest
import torch

from ladder_kernels import quantize_nf4
from ladder_kernels.backends import backend_info, kernel
from ladder_kernels.defaults import CPU_ISA_ENV, CPU_ISAS, POISON_OUTPUTS_ENV
from ladder_kernels.kernels import cpu
from ladder_kernels.planning.memory import PeakMemoryTracker
from ladder_kernels.quant import dequantize_nf4
from tests.helpers import REPO, forced_isa, rel_err, require_backend

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 1.5e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, N, K, blocksize, double_quant): M around the kernels' row blocks (4 / 6 per register block, 64 per item), N
# around 3 / 96 output rows per block / panel, K around 8 / 16 lanes, 128 / 256 panel widths and the blocksize
# (blocks straddling rows; an odd number of weights).
CASES = [
    (1, 5, 64, 64, True),
    (3, 97, 100, 64, True),
    (7, 40, 257, 32, False),
    (13, 100, 129, 128, True),
    (66, 37, 97, 64, True),
    (130, 193, 40, 64, False),
    (70, 300, 1100, 64, True),  # fp32 on AVX2 goes to BLAS tiles here: several tiles and 512-long reduce chunks
    # AVX2's fused decode path (M <= 4, K and blocksize multiples of 32): 1-4 rows, blocks straddling rows
    (2, 37, 160, 64, True),
    (4, 129, 1024, 64, False),
    (3, 1, 96, 64, True),
    (1, 33, 224, 32, True),
]


def runnable_isas() -> list[str]:
    """The code paths this CPU runs, best first: avx512 / avx2 where supported, scalar always."""
    require_backend("cpu")
    found = []
    for isa in CPU_ISAS[1:]:
        try:
            with forced_isa(isa):
                found.append(cpu.isa())
        except RuntimeError:
            pass
    return found


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """The C++ ops fill their outputs with NaN before the kernel writes them (POISON_OUTPUTS_ENV), so an element a
    kernel forgets to write cannot pass by luck."""
    # the names the C++ reads
    assert f'"{POISON_OUTPUTS_ENV}"' in (REPO / "csrc" / "outputs.h").read_text()
    assert f'"{CPU_ISA_ENV}"' in (REPO / "csrc" / "nf4_matmul.cpp").read_text()
    monkeypatch.setenv(POISON_OUTPUTS_ENV, "1")
    yield


def weight(n, k, blocksize, double_quant):
    w = torch.randn(n, k) * (1 + torch.rand(n, 1))  # rows of different scales
    return quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)


def op_args(q):
    return (q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset, *q.shape, q.blocksize)


ISAS = ["scalar", "avx2", "avx512"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_code_path_matches_float64_reference(isa, dtype, poisoned_outputs):
    if isa not in runnable_isas():
        pytest.skip(f"this CPU does not run the {isa} kernels")
    fwd, grad = kernel("nf4_matmul", "cpu"), kernel("nf4_matmul_grad_input", "cpu")
    with forced_isa(isa):
        assert cpu.isa() == isa and backend_info()["cpu_isa"] == isa
        for m, n, k, blocksize, dq in CASES:
            q = weight(n, k, blocksize, dq)
            w64 = dequantize_nf4(q, torch.float64)
            for x in (torch.randn(m, k).to(dtype), torch.randn(k, m).to(dtype).t()):  # row- and column-major
                bias = torch.randn(n).to(dtype)
                out = fwd(x, *op_args(q), bias)
                assert out.dtype == dtype and out.shape == (m, n)
                assert rel_err(out, x.double() @ w64.t() + bias.double()) <= TOL[dtype], (isa, m, n, k)
            for g in (torch.randn(m, n).to(dtype), torch.randn(n, m).to(dtype).t()):
                gx = grad(g, *op_args(q))
                assert gx.shape == (m, k) and rel_err(gx, g.double() @ w64) <= TOL[dtype], (isa, m, n, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_code_paths_agree(dtype):
    """Every path reads the same weight values: outputs differ only by summation order."""
    isas = runnable_isas()
    assert "scalar" in isas and len(isas) >= 2, isas  # the CPUs this runs on have AVX2 at least
    q = weight(70, 300, 64, True)
    x = torch.randn(37, 300).to(dtype)
    g = torch.randn(37, 70).to(dtype)
    outs = {}
    for isa in isas:
        with forced_isa(isa):
            fwd, grad = kernel("nf4_matmul", "cpu"), kernel("nf4_matmul_grad_input", "cpu")
            outs[isa] = (fwd(x, *op_args(q), None), grad(g, *op_args(q)))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for isa in isas[1:]:
        assert rel_err(outs[isa][0], outs["scalar"][0]) <= tol and rel_err(outs[isa][1], outs["scalar"][1]) <= tol


def test_forcing_an_unavailable_or_unknown_path_fails_clearly():
    require_backend("cpu")
    x = torch.randn(2, 64)
    q = weight(8, 64, 64, True)
    with forced_isa("sse9"):
        with pytest.raises(RuntimeError, match=f"{CPU_ISA_ENV} must be one of auto, avx512, avx2, scalar"):
            kernel("nf4_matmul", "cpu")(x, *op_args(q), None)
        assert backend_info()["cpu_isa"].startswith("error:")
    missing = [isa for isa in ISAS if isa not in runnable_isas()]
    for isa in missing:
        with forced_isa(isa), pytest.raises(RuntimeError, match=f"this CPU cannot run the {isa} kernels"):
            kernel("nf4_matmul_grad_input", "cpu")(torch.randn(2, 8), *op_args(q))
    with forced_isa("auto"):
        assert cpu.isa() == runnable_isas()[0]  # the best one (CPU_ISAS lists the best first)


def test_bad_nested_statistics_are_rejected():
    require_backend("cpu")
    q = weight(8, 64, 64, True)
    x = torch.randn(2, 64)
    fwd = kernel("nf4_matmul", "cpu")
    packed, absmax, code, nested_absmax, nested_code, offset, n, k, bs = op_args(q)
    with pytest.raises(RuntimeError, match="come together"):
        fwd(x, packed, absmax, code, nested_absmax, None, offset, n, k, bs, None)
    with pytest.raises(RuntimeError, match="absmax must be float32 without nested statistics"):
        fwd(x, packed, absmax, code, None, None, None, n, k, bs, None)
    with pytest.raises(RuntimeError, match="absmax must be uint8 codes"):
        fwd(x, packed, q.block_absmax(), code, nested_absmax, nested_code, offset, n, k, bs, None)
    with pytest.raises(RuntimeError, match="nested_code must hold"):
        fwd(x, packed, absmax, code, nested_absmax, nested_code[:255], offset, n, k, bs, None)
    with pytest.raises(RuntimeError, match="offset must be float32"):
        fwd(x, packed, absmax, code, nested_absmax, nested_code, offset.double(), n, k, bs, None)


def _allocated_peak(fn) -> tuple[int, int]:
    """(peak bytes allocated through torch's CPU allocator on this thread during fn, bytes of its result), from
    the profiler's memory events: what a C++ op allocates for itself (scratch) is seen too."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    # each allocation and free is one "[memory]" event of the raw (kineto) results, in bytes (< 0: freed)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, out.untyped_storage().nbytes()


@pytest.mark.parametrize("direction", ["forward", "grad_input"])
@pytest.mark.parametrize("m", [1, 200])
def test_extra_memory_is_under_a_32nd_of_a_fp32_weight(direction, m):
    """A double-quantized 2048 x 2048 weight: no decoded absmax, no dequantized copy; scratch within 1/32 of the
    weight in fp32 (16 MiB), on every code path, measured two ways (tensors the op makes, as the memory planner
    sees them, and the allocator's own events, which see the C++ scratch). The allocator's count is taken beyond
    the workspace torch.mm itself allocates for the dense product of the same shapes and dtype: a 16-bit BLAS
    (oneDNN on CPUs with AVX-512) packs the activations into 130-390 KiB of its own on every call, whatever the
    weight, and the op's tiles pay it as the dense product does."""
    from ladder_kernels import nf4_matmul

    q = quantize_nf4(torch.randn(2048, 2048) * 0.02, blocksize=64, double_quant=True)
    dense = dequantize_nf4(q, torch.bfloat16)
    limit = 2048 * 2048 * 4 // 32
    x = torch.randn(m, 2048, dtype=torch.bfloat16, requires_grad=direction == "grad_input")
    g = torch.randn(m, 2048, dtype=torch.bfloat16)
    with torch.no_grad():
        dense_fn = (lambda: x @ dense.t()) if direction == "forward" else (lambda: g @ dense)  # noqa: E731
        dense_fn()  # BLAS's first call may set up state of its own
        dense_peak, dense_out = _allocated_peak(dense_fn)
    blas_workspace = dense_peak - dense_out
    for isa in runnable_isas():
        with forced_isa(isa):
            if direction == "forward":
                fn = lambda: nf4_matmul(x, q, backend="cpu")  # noqa: E731
            else:
                y = nf4_matmul(x, q, backend="cpu")
                fn = lambda: torch.autograd.grad(y, x, g, retain_graph=True)[0]  # noqa: E731
            with torch.no_grad() if direction == "forward" else torch.enable_grad():
                with PeakMemoryTracker() as tracker:
                    out = fn()
                tracked = tracker.peak_bytes - out.untyped_storage().nbytes()
                peak, out_bytes = _allocated_peak(fn)
            extra = peak - out_bytes - blas_workspace
            assert tracked < limit and extra < limit, (isa, tracked, extra, blas_workspace, limit)
            assert peak >= out_bytes > 0  # the profiler did see the allocations
