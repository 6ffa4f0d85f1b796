"""Ahead-of-time compile check of the Triton kernels for CUDA targets, on a machine without a GPU (bench/gpu_aot).

Each call shape runs the real launcher (nf4_matmul, downproj, cross_entropy) on meta tensors with the kernel
objects swapped for recorders (`capture_launches`): what is recorded is exactly what a launch would pass.
Triton's own binder then specializes those arguments for a target (`specialize`: M=1 becomes a constant, sizes
and pointers divisible by 16 get the divisibility flag, ints past 2**31 become i64), and `compile_job` builds
the kernel with Triton's compiler and bundled ptxas (`ptxas -v` log: registers, spill stores; metadata.shared).
Pruning is the launchers' own `early_config_prune`, run inside `_common.assume_device(target)`: one source of
truth for which configs a card gets. The checks (`check`): per target and shape, at least one config survives
pruning and fits the card's per-block shared memory, the no-autotune default fits, no surviving or default
config spills on sm_86 / sm_89 (no register headroom on consumer cards), and no survivor exceeds the limit.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from ladder_kernels.kernels.triton import _common
from ladder_kernels.kernels.triton import cross_entropy as ce_mod
from ladder_kernels.kernels.triton import downproj as dp_mod
from ladder_kernels.kernels.triton import nf4_matmul as nf4_mod

TARGETS = (80, 86, 89, 90)
NO_SPILL_TARGETS = (86, 89)  # consumer cards: a spill there is a slow kernel
KERNEL_MODULES = (nf4_mod, dp_mod, ce_mod)


@dataclass
class Launch:
    """One recorded kernel launch: the JIT kernel, its arguments, and the autotuner if it went through one."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    autotuner: Optional[Autotuner] = None


class _Recorder:
    def __init__(self, obj, launches: list[Launch]):
        self.obj, self.launches = obj, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            tuner = self.obj if isinstance(self.obj, Autotuner) else None
            self.launches.append(Launch(tuner.fn if tuner else self.obj, args, kwargs, tuner))

        return record


@contextlib.contextmanager
def capture_launches(modules=KERNEL_MODULES) -> Iterator[list[Launch]]:
    """Within the block, launching any kernel (or autotuner) defined in `modules` records it instead."""
    launches: list[Launch] = []
    saved = []
    for module in modules:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, (JITFunction, Autotuner)):
                saved.append((module, name, obj))
                setattr(module, name, _Recorder(obj, launches))
    try:
        yield launches
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


@contextlib.contextmanager
def _autotune(enabled: bool):
    old = os.environ.get("LADDER_KERNELS_AUTOTUNE")
    os.environ["LADDER_KERNELS_AUTOTUNE"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LADDER_KERNELS_AUTOTUNE"]
        else:
            os.environ["LADDER_KERNELS_AUTOTUNE"] = old


# ---- call shapes: the launches the ops make, on meta tensors ---------------------------------------------------

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


@dataclass(frozen=True)
class CallShape:
    name: str
    launch: Callable[[], None]
    quick: bool = False


def _nf4_call(direction: str, m: int, n: int, k: int, dtype: str, blocksize: int = 64) -> Callable[[], None]:
    def launch():
        # double-quantized statistics, as users' weights have them (uint8 codes decoded in the kernel)
        n_blocks = triton.cdiv(n * k, blocksize)
        packed, absmax = _meta((n * k + 1) // 2, dtype=torch.uint8), _meta(n_blocks, dtype=torch.uint8)
        stats = (absmax, _meta(16), _meta(triton.cdiv(n_blocks, 256)), _meta(256), _meta(1))
        a = _meta(m, k if direction == "fwd" else n, dtype=_DT[dtype])
        grad = direction == "grad_in"
        nf4_mod._nf4_gemm(a, packed, stats, n, k, blocksize, None, grad, None, None)

    return launch


def _downproj_call(direction: str, m: int, d_in: int, d_out: int, dtype: str, storage: str) -> Callable[[], None]:
    def launch():
        if direction == "fwd":
            dp_mod.forward(_meta(m, d_in, dtype=_DT[dtype]), _meta(d_out, d_in, dtype=_DT[dtype]), None, storage)
        else:
            saved_dtype = torch.int8 if storage == "int8" else _DT[dtype] if dtype != "fp32" else torch.bfloat16
            g = _meta(m, d_out, dtype=_DT[dtype])
            dp_mod.backward(g, _meta(m, d_in, dtype=saved_dtype), _meta(m), _DT[dtype], _DT[dtype])

    return launch


def _ce_call(rows: int, vocab: int, dtype: str, softcap: float, grad: bool) -> Callable[[], None]:
    def launch():
        ce_mod.ce_rows_(_meta(rows, vocab, dtype=_DT[dtype]), _meta(rows, dtype=torch.int64), -100, softcap, grad)

    return launch


def call_shapes() -> list[CallShape]:
    """Llama-7B-sized calls (N = K = 4096; the sizes only enter as divisibility) at M = 1, M <= 16 and large M,
    K aligned to the blocksize and not (4100), every dtype, and int64 offsets (M = 2**19 rows of 4096)."""
    shapes = []
    for direction in ("fwd", "grad_in"):
        for dtype in _DT:
            for k, kname in ((4096, "K4096"), (4100, "K4100")):
                for m in (1, 7, 2048):
                    quick = dtype == "bf16" and (m != 7 if k == 4096 else m == 2048)
                    name = f"nf4 {direction} M={m} {kname} {dtype}"
                    shapes.append(CallShape(name, _nf4_call(direction, m, 4096, k, dtype), quick))
        shapes.append(
            CallShape(f"nf4 {direction} M=2^19 K4096 bf16 int64", _nf4_call(direction, 2**19, 4096, 4096, "bf16"))
        )
    for direction in ("fwd", "bwd"):
        for dtype in _DT:
            for storage in ("int8", "bf16"):
                for m in (7, 2048):
                    quick = dtype == "bf16" and m == 2048
                    name = f"downproj {direction} M={m} {dtype} {storage}"
                    shapes.append(CallShape(name, _downproj_call(direction, m, 4096, 512, dtype, storage), quick))
        name = f"downproj {direction} M=2^19 bf16 int8 int64"
        shapes.append(CallShape(name, _downproj_call(direction, 2**19, 4096, 512, "bf16", "int8")))
    for dtype in ("bf16", "fp32"):
        for softcap in (0.0, 30.0):
            for grad in (False, True):
                name = f"ce rows V=32000 {dtype}{' softcap' if softcap else ''}{' grad' if grad else ''}"
                shapes.append(CallShape(name, _ce_call(2048, 32000, dtype, softcap, grad), dtype == "bf16" and grad))
    shapes.append(CallShape("ce rows V=128256 bf16 grad int64", _ce_call(2**15, 128256, "bf16", 0.0, True)))
    return shapes


# ---- specialization and compilation ---------------------------------------------------------------------------


def config_label(kwargs: dict, num_warps: int, num_stages: int) -> str:
    tiles = [str(v) for key, v in kwargs.items() if key.startswith("BLOCK_")]
    split = kwargs.get("SPLIT", 1)
    return "x".join(tiles) + (f" split{split}" if split > 1 else "") + f" w{num_warps} s{num_stages}"


@dataclass
class Job:
    """One kernel to compile: picklable (the JIT function by module and name) so a process pool can take it."""

    module: str
    fn_name: str
    capability: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def key(self) -> str:
        return repr((self.module, self.fn_name, self.capability, self.signature, self.constexprs, self.attrs,
                     sorted(self.options.items())))  # fmt: skip


def specialize(fn: JITFunction, args: tuple, kwargs: dict, capability: int) -> Job:
    """The (signature, constexprs, attrs, options) a launch with these arguments compiles, by Triton's own binder
    for GPUTarget("cuda", capability, 32)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return Job(fn.fn.__module__, fn.__name__, capability, signature, constexprs, attrs, dict(options.__dict__))


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores")


def compile_job(job: Job) -> dict:
    """Compile `job` (needs TRITON_INTERPRET unset and a fresh TRITON_CACHE_DIR, else ptxas does not run and
    logs nothing): {"shared", "regs", "spills", "mma"} or {"error"}."""
    import importlib

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.fn_name)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(fn, job.signature, job.constexprs, job.attrs),
                target=GPUTarget("cuda", job.capability, 32),
                options=job.options,
            )
    except Exception as exc:  # a kernel that does not compile for the target is a finding, not a crash
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"}
    text = log.getvalue()
    regs, spills = _REGS.findall(text), _SPILLS.findall(text)
    ptx = kernel.asm["ptx"]
    return {
        "shared": kernel.metadata.shared,
        "regs": int(regs[-1]) if regs else -1,
        "spills": int(spills[-1]) if spills else -1,
        "mma": "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "-",
    }


# ---- the plan: per target and shape, which configs to compile and what each one is -----------------------------


@dataclass
class Entry:
    target: int
    shape: str
    config: str
    default: bool  # the no-autotune (LADDER_KERNELS_AUTOTUNE=0) launch
    kept: bool  # survives the autotuner's pruning on this target
    job: Job
    result: dict = field(default_factory=dict)


def plan(targets, shapes: list[CallShape], limits: dict[int, int], every_config: bool) -> list[Entry]:
    """Entries for every (target, shape): the default config, the configs pruning keeps and, with every_config,
    the pruned ones too (to show what the pruning removes)."""
    entries = []
    for cap in targets:
        facts = _common.facts_for(cap, limits.get(cap))
        with _common.assume_device(facts):
            for shape in shapes:
                by_label: dict[str, Entry] = {}
                for autotune in (False, True):
                    with _autotune(autotune), capture_launches() as launches:
                        shape.launch()
                    for launch in launches:
                        for label, kwargs, kept in _variants(launch, every_config):
                            job = specialize(launch.fn, launch.args, kwargs, cap)
                            entry = by_label.setdefault(label, Entry(cap, shape.name, label, False, False, job))
                            entry.default |= not autotune
                            entry.kept |= kept
                entries += by_label.values()
    return entries


def _variants(launch: Launch, every_config: bool):
    """(label, kwargs, kept) per config this launch may compile."""
    if launch.autotuner is None:
        kw = launch.kwargs
        consts = {k: v for k, v in kw.items() if k.startswith("BLOCK_") or k in ("SPLIT", "GROUP_M")}
        yield config_label(consts, kw.get("num_warps", 4), kw.get("num_stages", 3)), kw, False
        return
    tuner = launch.autotuner
    nargs = dict(zip(tuner.arg_names, launch.args))
    kept = (
        tuner.early_config_prune(tuner.configs, nargs, **launch.kwargs) if tuner.early_config_prune else tuner.configs
    )
    kept_ids = {id(c) for c in kept}
    for config in tuner.configs if every_config else kept:
        kwargs = {**launch.kwargs, **config.all_kwargs()}
        yield config_label(config.kwargs, config.num_warps, config.num_stages), kwargs, id(config) in kept_ids


def run_jobs(entries: list[Entry], jobs: int, progress: Callable[[str], None] = lambda s: None) -> None:
    """Compile every distinct job once (a process pool of `jobs` workers), filling each entry's result."""
    import concurrent.futures
    import multiprocessing

    unique: dict[str, Job] = {}
    for e in entries:
        unique.setdefault(e.job.key(), e.job)
    results: dict[str, dict] = {}
    if jobs <= 1:
        for i, (key, job) in enumerate(unique.items()):
            results[key] = compile_job(job)
            progress(f"{i + 1}/{len(unique)}")
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = {pool.submit(compile_job, job): key for key, job in unique.items()}
            for i, fut in enumerate(concurrent.futures.as_completed(futures)):
                results[futures[fut]] = fut.result()
                progress(f"{i + 1}/{len(unique)}")
    for e in entries:
        e.result = results[e.job.key()]


def check(entries: list[Entry], limits: dict[int, int]) -> list[str]:
    """The failures (empty when all holds)."""
    failures = []
    groups: dict[tuple[int, str], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.target, e.shape), []).append(e)
    for (cap, shape), group in groups.items():
        limit = _common.facts_for(cap, limits.get(cap)).shared_memory_per_block
        where = f"sm_{cap} {shape}"

        def fits(e: Entry) -> bool:
            return "error" not in e.result and e.result["shared"] <= limit

        for e in group:
            if "error" in e.result and (e.kept or e.default):
                failures.append(f"{where} {e.config}: does not compile: {e.result['error']}")
        tuned = [e for e in group if e.kept]  # empty: no autotuned launch (cross-entropy rows)
        if tuned and not any(fits(e) for e in tuned):
            failures.append(f"{where}: no config survives pruning within {limit} B of shared memory")
        for e in tuned:
            if "error" not in e.result and not fits(e):
                failures.append(f"{where} {e.config}: kept by pruning but needs {e.result['shared']} B > {limit}")
        for e in group:
            if e.default and "error" not in e.result and not fits(e):
                failures.append(f"{where} {e.config}: the default config needs {e.result['shared']} B > {limit}")
        if cap in NO_SPILL_TARGETS:
            for e in group:
                if (e.kept or e.default) and e.result.get("spills", 0) > 0:
                    failures.append(f"{where} {e.config}: spills {e.result['spills']} B (kept or default)")
    return failures
