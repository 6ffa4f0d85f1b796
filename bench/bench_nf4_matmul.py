#!/usr/bin/env python
"""Kernel bench: `nf4_matmul` against bitsandbytes and dense matmuls on the same NF4 weight.

Methods, timed side by side on one weight per shape (double-quantized NF4, bitsandbytes' bytes), in each
direction (--directions): forward x @ W.T, and grad_input g @ W (what backward runs):
  nf4_matmul[<backend>]  ladder_kernels' op on each available backend (cpu: "cpu", "torch"; cuda: "triton", "torch"),
                         reading the double-quantized absmax as stored (the kernels decode it); the first backend
                         also runs with it decoded to fp32 beforehand ("cached absmax", 4 bytes per block)
  bnb.matmul_4bit        bitsandbytes' own 4-bit matmul on the very same packed bytes and QuantState (grad_input:
                         what its backward does, dequantize_4bit then matmul)
  dequant+matmul         dequantize the whole weight (ladder_kernels' PyTorch dequantizer), then matmul
  dense                  x @ W.T on a weight dequantized beforehand: the speed limit a 4-bit kernel aims at

Timing: every method runs `--warmup` times, then `--repeats` interleaved rounds (one call of each method per
round, so a noisy neighbour slows all methods alike); the median is reported. On CUDA each call is a CUDA
graph replayed after an L2 flush, timed with CUDA events (bench/gpu_timing.py).
Extra memory of one call (what it allocates beyond its inputs and its output):
  cpu   extra_mib_tensors: peak of live tensor storages allocated through the dispatcher
        (ladder_kernels.planning.memory.PeakMemoryTracker; a C++ op's internal buffers are invisible to it);
        extra_mib_process: peak resident memory of the process during the call (its high-water mark is
        reset first, and glibc is told to return freed blocks to the OS), which does see them
  cuda  extra_mib_process: torch.cuda.max_memory_allocated during the call
Writes bench/results/nf4_matmul_<device>.csv (long format, one row per method and case) and a markdown
table next to it, both atomically.

    .venv/bin/python bench/bench_nf4_matmul.py --quick            # CPU-sized shapes (about 7 minutes on 2 busy cores)
    .venv/bin/python bench/bench_nf4_matmul.py --device cuda      # LLM shapes on a GPU
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as dt
import gc
import io
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a plain script from a source checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ladder_kernels.backends import backend_info, triton_interpreting  # noqa: E402
from ladder_kernels.ops.nf4_matmul import nf4_matmul  # noqa: E402
from ladder_kernels.planning.memory import PeakMemoryTracker  # noqa: E402
from ladder_kernels.quant.nf4 import NF4Weight, dequantize_nf4, quantize_nf4  # noqa: E402

MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL_MS = (1, 16, 128, 512, 2048)
FULL_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (N, K) = (out_features, in_features)
# --quick: a CPU-sized sweep, plus one 8192x8192 weight for the memory figure (a full fp32 copy is 256 MiB)
QUICK_CASES = tuple(((2048, 2048), m) for m in FULL_MS) + (((8192, 8192), 1), ((8192, 8192), 512))
DENSE, BNB, DEQUANT, CACHED_ABSMAX = "dense", "bnb.matmul_4bit", "dequant+matmul", "cached absmax"
# how far a method's output may be from the dense matmul's (same dequantized weight, other summation order)
AGREEMENT_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
MIN_BATCH_MS, MAX_BATCH = 5.0, 50  # calls per timed batch: enough to last MIN_BATCH_MS, at most MAX_BATCH


# --- what runs ---------------------------------------------------------------------------------------------
def default_backends(device: str) -> list[str]:
    if device == "cuda":
        return ["triton", "torch"]
    backends = ["cpu"] if backend_info()["cpu"] else []
    if triton_interpreting():  # the interpreter is far too slow to time (and not a product path)
        print("note: TRITON_INTERPRET=1 is set; the triton backend is left out on CPU", file=sys.stderr)
    return backends + ["torch"]


def make_methods(
    x: torch.Tensor, q: NF4Weight, w_dense: torch.Tensor, backends: list[str], direction: str = "forward"
) -> dict[str, Callable[[], torch.Tensor]]:
    """Every method as a no-argument call returning x @ W.T (forward; x [M, K]) or x @ W (grad_input, the input
    gradient of a linear layer; x is its output gradient [M, N]). All see the same x and the same NF4 bytes."""
    if direction == "grad_input":
        return _grad_input_methods(x, q, w_dense, backends)
    methods: dict[str, Callable[[], torch.Tensor]] = {}
    for backend in backends:
        methods[f"nf4_matmul[{backend}]"] = lambda b=backend: nf4_matmul(x, q, backend=b)
    if q.double_quant and backends:
        # As above, but with the per-block absmax dequantized once beforehand (a layer may cache it, at 4 bytes
        # per block): shows what reading the double-quantized statistics inside the kernel costs.
        absmax = q.block_absmax()
        methods[f"nf4_matmul[{backends[0]}] {CACHED_ABSMAX}"] = lambda: nf4_matmul(
            x, q, backend=backends[0], absmax=absmax
        )
    try:
        import bitsandbytes as bnb

        packed, state = q.to_bnb()
        methods[BNB] = lambda: bnb.matmul_4bit(x, packed.t(), state)
    except ImportError:
        print("note: bitsandbytes is not installed; its column stays empty", file=sys.stderr)
    methods[DEQUANT] = lambda: x @ dequantize_nf4(q, x.dtype).t()
    methods[DENSE] = lambda: x @ w_dense.t()
    return methods


def _grad_input_methods(g: torch.Tensor, q: NF4Weight, w_dense: torch.Tensor, backends: list[str]) -> dict:
    """The grad_input direction: the op's kernel (what backward runs), bitsandbytes' backward (MatMul4Bit
    dequantizes the weight whole, then multiplies), dequantize + matmul, and the dense matmul."""
    op = torch.ops.ladder.nf4_matmul_grad_input
    n, k = q.shape
    methods: dict[str, Callable[[], torch.Tensor]] = {}
    stats = (q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset)
    for backend in backends:
        methods[f"nf4_matmul[{backend}]"] = lambda b=backend: op(g, q.packed, *stats, n, k, q.blocksize, b)
    if q.double_quant and backends:
        cached = (q.block_absmax(), q.code, None, None, None)
        methods[f"nf4_matmul[{backends[0]}] {CACHED_ABSMAX}"] = lambda: op(
            g, q.packed, *cached, n, k, q.blocksize, backends[0]
        )
    try:
        import bitsandbytes.functional as bnb_functional

        packed, state = q.to_bnb()
        methods[BNB] = lambda: g @ bnb_functional.dequantize_4bit(packed, state).to(g.dtype)
    except ImportError:
        pass
    methods[DEQUANT] = lambda: g @ dequantize_nf4(q, g.dtype)
    methods[DENSE] = lambda: g @ w_dense
    return methods


def select(methods: dict[str, Callable], args) -> dict[str, Callable]:
    """The methods whose name contains one of --methods (all by default); dense always (the ratios' base)."""
    wanted = getattr(args, "methods", None)
    if not wanted:
        return methods
    return {name: fn for name, fn in methods.items() if name == DENSE or any(w in name for w in wanted)}


# --- timing ------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(methods: dict[str, Callable], device: str, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each method over `repeats` rounds; each round calls every method in turn.

    On CPU a method faster than MIN_BATCH_MS is called several times back to back per round (and the mean
    taken), so timer resolution and a neighbour's scheduling blip do not dominate tiny cases."""
    if device == "cuda":
        from gpu_timing import time_methods  # bench/gpu_timing.py: CUDA graphs after an L2 flush

        return time_methods(methods, warmup, repeats)
    batch = {}
    for name, fn in methods.items():
        for _ in range(max(warmup - 1, 0)):
            fn()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        batch[name] = max(1, min(MAX_BATCH, int(MIN_BATCH_MS / max((time.perf_counter() - t0) * 1e3, 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            for _ in range(batch[name]):
                fn()
            times[name].append((time.perf_counter() - t0) * 1e3 / batch[name])
    return times


# --- extra memory of one call ------------------------------------------------------------------------------
_RSS_PEAK_RESETTABLE: Optional[bool] = None
_LIBC = None


def _malloc_returns_freed_memory() -> None:
    """Make glibc serve every block of 64 KiB or more with mmap and unmap it on free (by default it adapts its
    threshold upwards and keeps freed blocks), so that a later allocation shows up in the process's RSS."""
    global _LIBC
    try:
        _LIBC = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        _LIBC.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    except (OSError, AttributeError):
        _LIBC = None


def _release_free_heap() -> None:
    """Hand free heap memory back to the OS, so an allocation cannot reuse already-resident pages unseen."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    global _RSS_PEAK_RESETTABLE
    if _RSS_PEAK_RESETTABLE is False:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _RSS_PEAK_RESETTABLE = True
    except OSError:
        _RSS_PEAK_RESETTABLE = False
    return _RSS_PEAK_RESETTABLE


def extra_memory_mib(fn: Callable[[], torch.Tensor], device: str) -> tuple[Optional[float], Optional[float]]:
    """(tensor-tracker MiB, process/allocator MiB) that one call needs beyond its output."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return None, max(0, peak - out.untyped_storage().nbytes()) / MIB
    with PeakMemoryTracker() as tracker:
        out = fn()
    tensors = max(0, tracker.peak_bytes - out.untyped_storage().nbytes()) / MIB
    del out
    gc.collect()
    _release_free_heap()
    process = None
    if _reset_rss_peak():
        base_kib = _proc_status_kib("VmRSS")
        out = fn()
        peak_kib = _proc_status_kib("VmHWM")
        process = max(0, (peak_kib - base_kib) * 1024 - out.untyped_storage().nbytes()) / MIB
    return tensors, process


# --- one case ------------------------------------------------------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def time_case(
    n: int, k: int, m: int, dtype: torch.dtype, q: NF4Weight, w_dense: torch.Tensor, args, direction: str = "forward"
) -> list[dict]:
    """One row per method: timing, and agreement with the dense matmul (memory columns filled in later)."""
    x = torch.randn(m, n if direction == "grad_input" else k, device=args.device, dtype=dtype)
    methods = select(make_methods(x, q, w_dense, args.backends, direction), args)
    with torch.no_grad():
        ref = methods[DENSE]()
        errors = {name: rel_err(fn(), ref) for name, fn in methods.items()}
        times = time_interleaved(methods, args.device, args.warmup, args.repeats)
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in methods:
        if errors[name] > AGREEMENT_TOL[dtype]:
            print(
                f"WARNING: {name} differs from the dense matmul by {errors[name]:.2e} at M={m} N={n} K={k} {dtype}",
                file=sys.stderr,
            )
        rows.append(
            dict(
                method=name,
                direction=direction,
                dtype=str(dtype).removeprefix("torch."),
                M=m,
                N=n,
                K=k,
                median_ms=round(median[name], 4),
                min_ms=round(min(times[name]), 4),
                repeats=args.repeats,
                tflops=round(2 * m * n * k / (median[name] * 1e-3) / 1e12, 4),
                ratio_vs_dense=round(median[name] / median[DENSE], 3),
                ratio_vs_bnb=round(median[name] / median[BNB], 3) if BNB in median else "",
                extra_mib_tensors="",
                extra_mib_process="",
                fp32_weight_mib=round(n * k * 4 / MIB, 2),
                rel_err_vs_dense=f"{errors[name]:.2e}",
                load_avg_1min=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
            )
        )
    return rows


def measure_case(
    k: int,
    m: int,
    dtype: torch.dtype,
    q: NF4Weight,
    w_dense: torch.Tensor,
    rows: list[dict],
    args,
    direction: str = "forward",
) -> None:
    """Fill in the memory columns of one case's rows."""
    x = torch.randn(m, q.shape[0] if direction == "grad_input" else k, device=args.device, dtype=dtype)
    methods = select(make_methods(x, q, w_dense, args.backends, direction), args)
    with torch.no_grad():
        for row in rows:
            tensors, process = extra_memory_mib(methods[row["method"]], args.device)
            row["extra_mib_tensors"] = "" if tensors is None else round(tensors, 2)
            row["extra_mib_process"] = "" if process is None else round(process, 2)


def cases(args) -> list[tuple[tuple[int, int], int]]:
    if args.shapes or args.ms:
        shapes = args.shapes or ([(2048, 2048)] if args.quick else list(FULL_SHAPES))
        return [(s, m) for s in shapes for m in (args.ms or FULL_MS)]
    if args.quick:
        return list(QUICK_CASES)
    return [(s, m) for s in FULL_SHAPES for m in FULL_MS]


# --- output --------------------------------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args) -> dict:
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = "not installed"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    return dict(
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join([sys.executable, *sys.argv]),
        device=args.device,
        device_name=device_name,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        bitsandbytes=bnb_version,
        triton=triton_version,
        blocksize=args.blocksize,
        double_quant=True,
        **({"cuda_timing": "CUDA graph per call after a 512 MiB L2 flush"} if args.device == "cuda" else {}),
    )


def to_csv(rows: list[dict], env: dict) -> str:
    buf = io.StringIO()
    fields = list(rows[0]) + list(env)
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **env})
    return buf.getvalue()


def load_note(rows: list[dict]) -> str:
    """CPU timings depend on what else runs on the machine: say how busy it was."""
    loads = [r["load_avg_1min"] for r in rows if r["load_avg_1min"] != ""]
    if not loads:
        return ""
    return f" 1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f} (on {os.cpu_count()} CPUs)."


def to_markdown(rows: list[dict], env: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        f"# nf4_matmul kernel bench ({env['device']}: {env['device_name']}, {env['threads']} threads)",
        "",
        f"{env['timestamp']} · torch {env['torch']} · bitsandbytes {env['bitsandbytes']} · triton {env['triton']} · "
        f"NF4 blocksize {env['blocksize']}, double-quantized",
        "",
        f"Command: `{env['command']}`",
        "",
        "Median milliseconds per call (x dense matmul on the pre-dequantized weight; x bitsandbytes matmul_4bit)."
        + load_note(rows),
        "",
    ]
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["direction"], r["dtype"], r["N"], r["K"], r["M"]), {})[r["method"]] = r
    header = "| direction | dtype | N x K | M | " + " | ".join(methods) + " |"
    lines += [header, "|" + " --- |" * (4 + len(methods))]
    for (direction, dtype, n, k, m), per_method in by_case.items():
        cells = []
        for name in methods:
            r = per_method.get(name)
            if r is None:
                cells.append("")
                continue
            ratio = f" ({r['ratio_vs_dense']:.2f}x" + (
                f", {r['ratio_vs_bnb']:.2f}x bnb)" if r["ratio_vs_bnb"] != "" and name != BNB else ")"
            )
            cells.append(f"{r['median_ms']:.3f}" + ("" if name == DENSE else ratio))
        lines.append(f"| {direction} | {dtype} | {n} x {k} | {m} | " + " | ".join(cells) + " |")
    mem_col = "extra_mib_process"
    lines += [
        "",
        "Extra memory of one call, MiB beyond inputs and output "
        + (
            "(peak process RSS during the call; tensor-tracker figure in the CSV)"
            if env["device"] == "cpu"
            else "(torch.cuda.max_memory_allocated)"
        )
        + ", and the size of a full fp32 copy of the weight.",
        "",
        "| direction | dtype | N x K | M | fp32 weight | " + " | ".join(methods) + " |",
        "|" + " --- |" * (5 + len(methods)),
    ]
    for (direction, dtype, n, k, m), per_method in by_case.items():
        cells = [str(per_method[name][mem_col]) if name in per_method else "" for name in methods]
        fp32 = next(iter(per_method.values()))["fp32_weight_mib"]
        lines.append(f"| {direction} | {dtype} | {n} x {k} | {m} | {fp32} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is NxK (out_features x in_features), e.g. 4096x11008, got {text!r}")
    if n <= 0 or k <= 0:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return n, k


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda if available)",
    )
    p.add_argument("--quick", action="store_true", help="CPU-sized shapes: 2048x2048 over all M, 8192x8192 at M=1, 512")
    p.add_argument(
        "--shapes", type=parse_shape, nargs="+", help="weight shapes NxK (out x in), overriding the defaults"
    )
    p.add_argument("--ms", type=int, nargs="+", help=f"activation rows M (default {FULL_MS})")
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPES),
        help="activation dtypes (default: fp32 bf16 on cpu, bf16 on cuda)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=("triton", "cpu", "torch"),
        help="nf4_matmul backends (default: every one usable here)",
    )
    p.add_argument(
        "--directions",
        nargs="+",
        choices=("forward", "grad_input"),
        help="forward (x @ W.T) and/or grad_input (g @ W, what backward runs; default: both on cpu, forward on cuda)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        help="time only the methods whose name contains one of these (e.g. nf4_matmul bnb); dense always runs",
    )
    p.add_argument("--blocksize", type=int, default=64, help="NF4 blocksize (default 64, as bitsandbytes)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per method first (default 2)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--repeats", type=int, help="timed rounds (default 7 on cpu, 25 on cuda)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the extra-memory measurement")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results", help="where the CSV and markdown go")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if args.ms and min(args.ms) <= 0:
        p.error(f"--ms must be positive, got {args.ms}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    args.dtypes = [DTYPES[d] for d in (args.dtypes or (["fp32", "bf16"] if args.device == "cpu" else ["bf16"]))]
    args.backends = args.backends or default_backends(args.device)
    args.directions = args.directions or (["forward", "grad_input"] if args.device == "cpu" else ["forward"])
    args.repeats = args.repeats or (7 if args.device == "cpu" else 25)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    env = environment(args)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for shape, m in cases(args):
        by_shape.setdefault(shape, []).append(m)
    weights = {}
    for n, k in by_shape:
        gen = torch.Generator(device="cpu").manual_seed(args.seed + n * 31 + k)
        weights[n, k] = quantize_nf4(
            (torch.randn(n, k, generator=gen) * 0.02).to(args.device), blocksize=args.blocksize, double_quant=True
        )
    n_cases = sum(len(ms) for ms in by_shape.values()) * len(args.dtypes) * len(args.directions)
    # Timing runs first, with the allocator as users have it; the memory pass then switches glibc to
    # returning freed memory at once (irreversible, and it makes every large allocation fault its pages in).
    phases = ["time"] + (["memory"] if args.memory else [])
    rows_of: dict[tuple, list[dict]] = {}
    with tqdm(total=n_cases * len(phases), desc="nf4_matmul bench", unit="case") as bar:
        for phase in phases:
            if phase == "memory" and args.device == "cpu":
                _malloc_returns_freed_memory()
            for (n, k), ms in by_shape.items():
                q = weights[n, k]
                for dtype in args.dtypes:
                    w_dense = dequantize_nf4(q, dtype)
                    for direction in args.directions:
                        for m in ms:
                            name = str(dtype).removeprefix("torch.")
                            bar.set_postfix_str(f"{phase} {direction} {n}x{k} M={m} {name}")
                            key = (direction, n, k, m, dtype)
                            if phase == "time":
                                rows_of[key] = time_case(n, k, m, dtype, q, w_dense, args, direction)
                            else:
                                measure_case(k, m, dtype, q, w_dense, rows_of[key], args, direction)
                            bar.update()
                    del w_dense
    rows = [row for case_rows in rows_of.values() for row in case_rows]
    stem = args.out_dir / f"nf4_matmul_{args.device}"
    write_atomic(stem.with_suffix(".csv"), to_csv(rows, env))
    markdown = to_markdown(rows, env)
    write_atomic(stem.with_suffix(".md"), markdown)
    print(markdown)
    print(f"wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
