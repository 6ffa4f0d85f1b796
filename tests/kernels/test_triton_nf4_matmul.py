"""The Triton nf4_matmul launchers (ladder_kernels.kernels.triton.nf4_matmul) against the float64 reference:
both launch paths (tiled and split-reduction), forced configs, int64 offsets, config validity, bad input.
Runs under TRITON_INTERPRET=1 without a GPU (tiny shapes, big tiles), plus one ahead-of-time sm_90 build;
on a GPU (bench/gpu_check) every autotune config and the autotuned launch are checked too."""

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402

from ladder_kernels import nf4_matmul, quantize_nf4  # noqa: E402
from ladder_kernels.kernels.triton import _common
from ladder_kernels.kernels.triton import nf4_matmul as tk
from ladder_kernels.ops.nf4_matmul import reference_forward, reference_grad_input  # noqa: E402
from ladder_kernels.quant import dequantize_nf4  # noqa: E402
from tests.helpers import DEVICE, REPO, poison_, rel_err  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 1.5e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, N, K, blocksize, double_quant): M on both sides of SMALL_M; K a multiple of the blocksize (whole-block
# rows: per-block absmax, with tiles of 1/2, 1 and 2 blocks) and not (blocks straddle rows; even and odd K);
# N and K not multiples of the 64-wide interpreter tiles.
CASES = [
    (1, 83, 150, 64, False),
    (7, 45, 97, 128, True),
    (16, 64, 128, 64, True),
    (37, 83, 256, 128, False),
    (5, 50, 160, 32, False),
    (133, 45, 96, 32, True),
    (37, 83, 150, 128, False),
    (133, 45, 97, 64, True),
]


def weight(n, k, blocksize, double_quant):
    """An NF4 weight and the statistics the launchers take: double-quantized ones in their nested form (uint8
    codes decoded in the kernel), plain ones as fp32 absmax with no nested statistics."""
    w = torch.randn(n, k) * (1 + torch.rand(n, 1))  # rows of different scales
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant).to(DEVICE)
    return q, stats_of(q)


def stats_of(q, cached=False):
    """(absmax, code, nested_absmax, nested_code, offset) of q; cached: the fp32 absmax decoded beforehand."""
    absmax, nested_absmax, nested_code, offset = (q.block_absmax(), None, None, None) if cached else q.absmax_args()
    return absmax, q.code, nested_absmax, nested_code, offset


def _double(stats):
    absmax, code, *nested = stats
    absmax = absmax.double() if absmax.dtype == torch.float32 else absmax  # uint8 codes stay codes
    return (absmax, code.double(), *(None if t is None else t.double() for t in nested))


def ref_forward(x, q, stats, bias):
    return reference_forward(
        x.double(), q.packed, *_double(stats), *q.shape, q.blocksize, None if bias is None else bias.double()
    )


def ref_grad_input(g, q, stats):
    return reference_grad_input(g.double(), q.packed, *_double(stats), *q.shape, q.blocksize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}_N{}_K{}_bs{}_dq{}".format(*c))
def test_launchers_match_float64_reference(case, dtype):
    m, n, k, blocksize, dq = case
    q, stats = weight(n, k, blocksize, dq)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    out = poison_(torch.empty(m, n, dtype=dtype, device=DEVICE))
    got = tk.forward(x, q.packed, *stats, n, k, blocksize, bias, out=out)
    assert got is out and not out.isnan().any()
    assert rel_err(out, ref_forward(x, q, stats, bias)) <= TOL[dtype]

    g = torch.randn(m, n, device=DEVICE).to(dtype)
    gx = poison_(torch.empty(m, k, dtype=dtype, device=DEVICE))
    tk.grad_input(g, q.packed, *stats, n, k, blocksize, out=gx)
    assert not gx.isnan().any()
    assert rel_err(gx, ref_grad_input(g, q, stats)) <= TOL[dtype]


@pytest.mark.parametrize("k", [128, 97])
def test_nested_and_cached_absmax_agree(k):
    """A double-quantized weight read in its nested form and with its fp32 absmax decoded beforehand: the kernel's
    decode rounds as the reference's (one fp32 product, one fp32 sum), so both match the float64 reference."""
    q, nested = weight(37, k, 64, True)
    cached = stats_of(q, cached=True)
    x = torch.randn(5, k, device=DEVICE)
    got = [tk.forward(x, q.packed, *stats, 37, k, 64, None) for stats in (nested, cached)]
    assert rel_err(got[0], got[1]) <= 1e-6
    assert rel_err(got[0], ref_forward(x, q, nested, None)) <= 1e-5
    g = torch.randn(5, 37, device=DEVICE)
    got = [tk.grad_input(g, q.packed, *stats, 37, k, 64) for stats in (nested, cached)]
    assert rel_err(got[0], got[1]) <= 1e-6
    assert rel_err(got[0], ref_grad_input(g, q, nested)) <= 1e-5


@pytest.mark.parametrize("k", [128, 97])
def test_non_contiguous_inputs(k):
    q, stats = weight(40, k, 64, True)
    n = 40
    x_t = torch.randn(k, 21, device=DEVICE).t()  # strides (1, 21)
    x_sliced = torch.randn(21, 2 * k, device=DEVICE)[:, ::2]  # strides (2k, 2)
    for x in (x_t, x_sliced):
        assert not x.is_contiguous()
        assert rel_err(tk.forward(x, q.packed, *stats, n, k, 64, None), ref_forward(x, q, stats, None)) <= 1e-5
    g = torch.randn(n, 21, device=DEVICE).t()
    assert rel_err(tk.grad_input(g, q.packed, *stats, n, k, 64), ref_grad_input(g, q, stats)) <= 1e-5


def _config(bm, bp, br, split=1, group_m=1):
    return triton.Config(
        dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_R=br, SPLIT=split, GROUP_M=group_m), num_warps=4, num_stages=2
    )


@pytest.mark.parametrize(
    "config",
    [
        _config(16, 32, 64, split=2),  # 5 reduction steps over 2 programs (3 + 2)
        _config(16, 32, 32, split=3),  # split count not a power of two
        _config(16, 64, 64, split=8),  # more splits than steps: some programs add nothing (and no bias)
        _config(16, 32, 32, split=1, group_m=2),  # plain store path, partial last group of row tiles
    ],
    ids=["split2", "split3", "split8_empty", "grouped"],
)
@pytest.mark.parametrize("k", [300, 320])
def test_forced_configs_split_and_grouping(config, k):
    m, n = 37, 70
    q, stats = weight(n, k, 64, False)
    x = torch.randn(m, k, device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    out = poison_(torch.empty(m, n, device=DEVICE))
    tk.forward(x, q.packed, *stats, n, k, 64, bias, out=out, config=config)
    assert rel_err(out, ref_forward(x, q, stats, bias)) <= 1e-5
    g = torch.randn(m, n, device=DEVICE)
    gx = poison_(torch.empty(m, k, device=DEVICE))
    tk.grad_input(g, q.packed, *stats, n, k, 64, out=gx, config=config)
    assert rel_err(gx, ref_grad_input(g, q, stats)) <= 1e-5


def test_int64_offset_path(monkeypatch):
    # A weight past 2**31 elements does not fit a test; lowering the limit sends small ones down that path.
    monkeypatch.setattr(_common, "INT32_SPAN_LIMIT", 100)
    assert _common.needs_int64_offsets(45 * 97)
    for m, k in ((3, 97), (40, 97), (3, 128), (40, 128)):
        q, stats = weight(45, k, 64, False)
        x = torch.randn(m, k, device=DEVICE)
        assert rel_err(tk.forward(x, q.packed, *stats, 45, k, 64, None), ref_forward(x, q, stats, None)) <= 1e-5
        g = torch.randn(m, 45, device=DEVICE)
        assert rel_err(tk.grad_input(g, q.packed, *stats, 45, k, 64), ref_grad_input(g, q, stats)) <= 1e-5


def test_zero_rows():
    q, stats = weight(8, 64, 64, False)
    assert tk.forward(torch.randn(0, 64, device=DEVICE), q.packed, *stats, 8, 64, 64, None).shape == (0, 8)
    assert tk.grad_input(torch.randn(0, 8, device=DEVICE), q.packed, *stats, 8, 64, 64).shape == (0, 64)


@pytest.mark.parametrize("dtype,k", [(torch.float32, 98), (torch.bfloat16, 128)])
def test_public_op_gradients(dtype, k):
    q = quantize_nf4(torch.randn(50, k), blocksize=64).to(DEVICE)
    x = torch.randn(2, 5, k, device=DEVICE).to(dtype).requires_grad_()
    bias = torch.randn(50, device=DEVICE).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 5, 50, device=DEVICE).to(dtype)
    out = nf4_matmul(x, q, bias, backend="triton")
    out.backward(grad_out)
    w64 = dequantize_nf4(q, torch.float64)
    assert out.dtype == dtype and out.shape == (2, 5, 50)
    assert rel_err(out, x.double() @ w64.t() + bias.double()) <= TOL[dtype]
    assert rel_err(x.grad, grad_out.double() @ w64) <= TOL[dtype]
    assert rel_err(bias.grad, grad_out.double().sum((0, 1))) <= TOL[dtype]


def test_autotune_configs_are_gpu_valid():
    tuned = tk._large_m_autotuned.configs + tk._small_m_autotuned.configs
    configs = tuned + [tk.INTERPRET_LARGE_M_CONFIG, tk.INTERPRET_SMALL_M_CONFIG]
    for c in configs:
        assert _common.config_problems(c, tk.TILE_KEYS) == [], c
        assert c.kwargs["SPLIT"] >= 1 and c.kwargs["GROUP_M"] >= 1
    assert all(c.kwargs["SPLIT"] == 1 for c in tk._large_m_autotuned.configs)  # the store path: no atomics
    assert all(c.kwargs["BLOCK_M"] == 16 for c in tk._small_m_autotuned.configs)
    assert len({str(c) for c in configs}) == len(configs)  # no duplicate timed twice
    # The checker itself rejects what a GPU would.
    bad = triton.Config(dict(BLOCK_M=8, BLOCK_P=48, BLOCK_R=64), num_warps=3, num_stages=9)
    assert len(_common.config_problems(bad, tk.TILE_KEYS)) == 4
    huge = triton.Config(dict(BLOCK_M=256, BLOCK_P=256, BLOCK_R=128), num_warps=8, num_stages=4)
    assert "shared memory" in _common.config_problems(huge, tk.TILE_KEYS)[0]


SM86, SM80, SM90 = (_common.facts_for(cap) for cap in (86, 80, 90))


def test_gpu_default_configs_and_pruning(monkeypatch):
    monkeypatch.setattr(tk, "triton_interpreting", lambda: False)
    for facts in (SM86, SM80, SM90):
        with _common.assume_device(facts):
            for m in (1, 16, 17, 64, 2048):
                for p, r in ((4096, 4096), (11008, 4096), (4096, 11008), (33, 70)):
                    for dtype in (torch.float32, torch.bfloat16):
                        for aligned in (True, False):
                            c = tk.default_config(m, p, r, dtype, torch.device("cuda"), aligned_k=aligned)
                            limit = facts.shared_memory_per_block
                            assert tk.fits_shared_memory(c, dtype.itemsize, aligned, limit), (facts, m, p, r, c)
                            assert (c.kwargs["BLOCK_M"] == 16) == (m <= tk.SMALL_M)
                            assert c.kwargs["SPLIT"] <= max(1, triton.cdiv(r, c.kwargs["BLOCK_R"]))
    with _common.assume_device(_common.facts_for(90, sm_count=132)):
        decode = tk.default_config(1, 4096, 4096, torch.bfloat16, torch.device("cuda"))
    assert decode.kwargs["SPLIT"] >= 4  # 64 column tiles alone would leave half of 132 SMs idle

    large = tk._large_m_autotuned.configs
    kept = tk.prune_configs(large, SM90, 20, 4096, dot_fp32=False, aligned_k=True)
    assert kept and all(c.kwargs["BLOCK_M"] <= 32 for c in kept)
    assert len(tk.prune_configs(large, SM90, 4096, 4096, dot_fp32=False, aligned_k=True)) == 12  # 10 + 2 fallbacks
    # Measured on sm_90 (bench/gpu_aot): fp32 operands, or per-element staging when blocks straddle rows,
    # push the widest tiles past shared memory.
    for dot_fp32, aligned in ((True, True), (False, False)):
        kept = tk.prune_configs(large, SM90, 4096, 4096, dot_fp32=dot_fp32, aligned_k=aligned)
        assert 0 < len(kept) < len(tk.configs_for(90, small_m=False))
        assert not any(
            c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_M"] == 128 * 256 and c.kwargs["BLOCK_R"] == 64 for c in kept
        )
    small = tk._small_m_autotuned.configs
    kept_small = tk.prune_configs(small, SM90, 1, 200, dot_fp32=False, aligned_k=True)
    assert kept_small and all(c.kwargs["SPLIT"] <= triton.cdiv(200, c.kwargs["BLOCK_R"]) for c in kept_small)


def wide(c):
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_P"] >= 128 * 256


@pytest.mark.parametrize("facts", [SM80, SM86, SM90], ids=lambda f: f"sm_{f.capability}")
@pytest.mark.parametrize("dot_fp32", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
def test_pruning_is_device_aware(facts, dot_fp32, aligned):
    """Pruning on CPU for a given (capability, limit): within the card's limit (by the model the AOT check
    validates), never 128x256 tiles below sm_90, and something left for every call, unaligned K included."""
    limit = facts.shared_memory_per_block
    for configs, m in ((tk._large_m_autotuned.configs, 4096), (tk._small_m_autotuned.configs, 1)):
        kept = tk.prune_configs(configs, facts, m, 4096, dot_fp32, aligned)
        assert kept
        assert all(tk.fits_shared_memory(c, 4 if dot_fp32 else 2, aligned, limit) for c in kept), kept
        assert all(any(c is a for a in tk.configs_for(facts.capability, m <= tk.SMALL_M)) for c in kept)
        if facts.capability < 90:
            assert not any(wide(c) for c in kept)
    if facts.capability >= 90 and aligned and not dot_fp32:
        assert any(wide(c) for c in tk.prune_configs(tk._large_m_autotuned.configs, facts, 4096, 4096, False, True))
    # A limit nothing fits still leaves one config (the smallest), which the AOT check then reports as OVER.
    tiny = _common.DeviceFacts(facts.capability, 1024, 4)
    assert len(tk.prune_configs(tk._large_m_autotuned.configs, tiny, 4096, 4096, dot_fp32, aligned)) == 1


def test_device_facts_fall_back_to_the_capability_table(monkeypatch):
    class Props:
        major, minor, multi_processor_count = 8, 6, 82

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 7)
    _common._cuda_facts.cache_clear()
    try:
        assert _common.device_facts(torch.device("cuda")) == _common.DeviceFacts(86, 101376, 82)
        Props.shared_memory_per_block_optin = 99 * 1024
        _common._cuda_facts.cache_clear()
        assert _common.device_facts(torch.device("cuda", 3)).shared_memory_per_block == 99 * 1024
    finally:
        _common._cuda_facts.cache_clear()
    assert _common.facts_for(89).shared_memory_per_block == 101376
    assert _common.facts_for(80).shared_memory_per_block == 166912
    assert _common.facts_for(90).shared_memory_per_block == 232448
    assert _common.device_facts(torch.device("cpu")).capability == _common.DEFAULT_CAPABILITY


def test_bad_input(monkeypatch):
    q, stats = weight(16, 64, 64, True)
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="x2d must have 64 columns"):
        tk.forward(torch.randn(3, 65, device=DEVICE), q.packed, *stats, 16, 64, 64, None)
    with pytest.raises(TypeError, match="x2d must be float32"):
        tk.forward(x.to(torch.int32), q.packed, *stats, 16, 64, 64, None)
    with pytest.raises(ValueError, match="uint8 codes need nested_absmax"):
        tk.forward(x, q.packed, q.absmax, q.code, None, None, None, 16, 64, 64, None)  # codes without statistics
    with pytest.raises(ValueError, match="nested_code is None"):
        tk.forward(x, q.packed, q.absmax, q.code, q.nested_absmax, None, q.offset, 16, 64, 64, None)
    with pytest.raises(ValueError, match="nested_absmax must hold"):
        tk.forward(x, q.packed, q.absmax, q.code, q.nested_absmax[:0], q.nested_code, q.offset, 16, 64, 64, None)
    with pytest.raises(ValueError, match="packed must be uint8 with 512 bytes"):
        tk.forward(x, q.packed[:-1], *stats, 16, 64, 64, None)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        tk.forward(x, q.packed, *stats, 16, 64, 48, None)
    with pytest.raises(ValueError, match="bias must be"):
        tk.forward(x, q.packed, *stats, 16, 64, 64, torch.randn(15, device=DEVICE))
    with pytest.raises(ValueError, match="g2d must have 16 columns"):
        tk.grad_input(x, q.packed, *stats, 16, 64, 64)
    with pytest.raises(ValueError, match="out must be"):
        tk.forward(x, q.packed, *stats, 16, 64, 64, None, out=torch.empty(3, 15, device=DEVICE))
    monkeypatch.setattr(tk, "triton_interpreting", lambda: False)
    monkeypatch.setattr(_common, "triton_interpreting", lambda: False)  # where the operand checks live
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        q_cpu = q.to("cpu")
        tk.forward(x.cpu(), q_cpu.packed, *stats_of(q_cpu), 16, 64, 64, None)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles real GPU kernels")


@cuda_only
@pytest.mark.parametrize("direction", ["forward", "grad_input"])
def test_every_autotune_config_on_gpu(direction):
    """Every config the autotuner may pick compiles and is right (autotuning keeps only the fastest). bf16
    only: 24 configs x 2 directions is already ~50 compiles."""
    n, k, blocksize = 1000, 1536, 64
    q, stats = weight(n, k, blocksize, True)
    for config in tk._large_m_autotuned.configs + tk._small_m_autotuned.configs:
        m = 5 if config.kwargs["SPLIT"] > 1 else 300
        if direction == "forward":
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            got = tk.forward(x, q.packed, *stats, n, k, blocksize, None, config=config)
            ref = ref_forward(x, q, stats, None)
        else:
            g = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
            got = tk.grad_input(g, q.packed, *stats, n, k, blocksize, config=config)
            ref = ref_grad_input(g, q, stats)
        assert rel_err(got, ref) <= TOL[torch.bfloat16], config


@cuda_only
@pytest.mark.parametrize("m", [1, 300])
def test_autotuned_path_on_gpu(m, monkeypatch):
    monkeypatch.setenv("LADDER_KERNELS_AUTOTUNE", "1")
    n, k, blocksize = 1000, 1536, 64
    q, stats = weight(n, k, blocksize, True)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    out = tk.forward(x, q.packed, *stats, n, k, blocksize, None)
    assert rel_err(out, ref_forward(x, q, stats, None)) <= TOL[torch.bfloat16]
    g = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
    gx = tk.grad_input(g, q.packed, *stats, n, k, blocksize)
    assert rel_err(gx, ref_grad_input(g, q, stats)) <= TOL[torch.bfloat16]


_COMPILE_FOR_HOPPER = """
import json, torch
from ladder_kernels.kernels.triton import aot, nf4_matmul as tk
from ladder_kernels.kernels.triton._common import assume_device, facts_for
out = {}
with assume_device(facts_for(90)), aot.capture_launches() as launches:
    aot._nf4_call("fwd", 2048, 4096, 4096, "bf16")()
    aot._nf4_call("grad_in", 7, 4096, 4100, "bf16")()
for name, launch in zip(("large", "small"), launches):
    out[name] = aot.compile_job(aot.specialize(launch.fn, launch.args, launch.kwargs, 90))
print(json.dumps(out))
"""


def test_compiles_for_hopper(tmp_path):
    """What the interpreter cannot show: the GPU compiler (Triton ships ptxas) accepts the kernel for sm_90 at
    the default (no-autotune) launch, the tiled path runs on wgmma tensor cores, and both paths fit in shared
    memory without spilling. (bench/gpu_aot does this for every kernel, config and target.)"""
    import json
    import os
    import subprocess
    import sys

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("this Triton ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(LADDER_KERNELS_AUTOTUNE="0", TRITON_CACHE_DIR=str(tmp_path))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["large"]["mma"] == "wgmma" and got["small"]["mma"] == "mma.sync", got
    for k in got.values():
        assert 0 < k["shared"] <= _common.facts_for(90).shared_memory_per_block and k["spills"] == 0, got
        assert k["regs"] > 0
