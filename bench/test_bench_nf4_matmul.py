"""pytest-benchmark variant of bench_nf4_matmul.py (kept out of tests/, so the default test run skips it):

    .venv/bin/python -m pytest bench/test_bench_nf4_matmul.py --benchmark-group-by=param:case
    .venv/bin/python -m pytest bench/test_bench_nf4_matmul.py --benchmark-save=nf4 --benchmark-compare

Each method is timed on the same NF4 weight and activations as the script's, and its output is first checked
against the dense matmul, so a fast but wrong method fails instead of topping the table.
"""

import pytest
import torch
from bench_nf4_matmul import AGREEMENT_TOL, BNB, CACHED_ABSMAX, DENSE, DEQUANT, default_backends, make_methods, rel_err

from ladder_kernels.quant.nf4 import dequantize_nf4, quantize_nf4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# (M, N, K): decode, a small batch, and the CPU target shape
CASES = [(1, 2048, 2048), (16, 2048, 2048), (512, 2048, 2048)]
BACKENDS = default_backends(DEVICE)
METHODS = [f"nf4_matmul[{b}]" for b in BACKENDS] + [f"nf4_matmul[{BACKENDS[0]}] {CACHED_ABSMAX}", BNB, DEQUANT, DENSE]


@pytest.fixture(scope="module")
def weights():
    """One NF4 weight (and its dense copy) per (N, K), shared by every method and M."""
    cache = {}

    def get(n, k):
        if (n, k) not in cache:
            gen = torch.Generator(device="cpu").manual_seed(n * 31 + k)
            q = quantize_nf4((torch.randn(n, k, generator=gen) * 0.02).to(DEVICE), blocksize=64, double_quant=True)
            cache[n, k] = q, dequantize_nf4(q, DTYPE)
        return cache[n, k]

    return get


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-{}x{}".format(*c))
def test_nf4_matmul_speed(benchmark, weights, case, method):
    m, n, k = case
    q, w_dense = weights(n, k)
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    methods = make_methods(x, q, w_dense, BACKENDS)
    if method not in methods:
        pytest.skip(f"{method} is not available here")
    fn = methods[method]
    with torch.no_grad():
        assert rel_err(fn(), methods[DENSE]()) <= AGREEMENT_TOL[DTYPE]

        def call():
            out = fn()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            return out

        benchmark.extra_info.update(M=m, N=n, K=k, dtype=str(DTYPE), threads=torch.get_num_threads())
        out = benchmark.pedantic(call, rounds=7, warmup_rounds=2)
    assert out.shape == (m, n) and out.dtype == DTYPE
