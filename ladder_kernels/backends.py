"""Which compute backends are usable here, and which one an op call takes.

Backends:
  triton            compiled Triton kernels (CUDA tensors)
  triton_interpret  the same kernels run by Triton's CPU interpreter (TRITON_INTERPRET=1, tests only)
  cpu_ext           the C++ kernels in csrc/ (ladder_kernels._C, or built just-in-time)
  torch             pure-PyTorch reference, always available
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os
import platform
import warnings
from pathlib import Path

import torch

BACKENDS = ("triton", "cpu", "torch")
_CSRC_DIRS = (Path(__file__).resolve().parent.parent / "csrc", Path(__file__).resolve().parent / "csrc")
_cpu_ext_error: str | None = None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs
        return f"import triton failed: {exc}"
    return None


def _jit_build_cpu_ext() -> None:
    """Build csrc/*.cpp with ninja into the user's cache dir (done once; torch caches by source hash)."""
    from torch.utils import cpp_extension

    csrc = next((d for d in _CSRC_DIRS if d.is_dir()), None)
    if csrc is None:
        raise RuntimeError("the C++ sources (csrc/) are not shipped with this install")
    sources = sorted(glob.glob(str(csrc / "*.cpp")))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ladder_kernels" / "torch_ext"
    cache.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-fopenmp"] + (["-march=x86-64-v2"] if platform.machine() == "x86_64" else [])
    cpp_extension.load(
        name="ladder_kernels_C",
        sources=sources,
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(cache),
        is_python_module=True,
        verbose=False,
    )


def _compiled_ext_is_stale() -> bool:
    """In a source checkout, a _C built before the latest csrc/ edit is stale: rebuild just-in-time instead."""
    built = list(Path(__file__).resolve().parent.glob("_C*.so"))
    sources = list(_CSRC_DIRS[0].glob("*.cpp"))
    return bool(built and sources) and max(s.stat().st_mtime for s in sources) > min(b.stat().st_mtime for b in built)


@functools.cache
def cpu_ext_available() -> bool:
    """Load the C++ CPU kernels: the compiled ladder_kernels._C, else a just-in-time build, else none."""
    global _cpu_ext_error
    if os.environ.get("LADDER_KERNELS_NO_CPU_EXT") == "1":
        _cpu_ext_error = "disabled by LADDER_KERNELS_NO_CPU_EXT=1"
        return False
    if not _compiled_ext_is_stale():
        try:
            from ladder_kernels import _C  # noqa: F401

            return True
        except ImportError:
            pass
    try:
        _jit_build_cpu_ext()
        return True
    except Exception as exc:
        _cpu_ext_error = f"C++ extension not built and the just-in-time build failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        warnings.warn(
            f"ladder_kernels: {_cpu_ext_error}. Falling back to the pure-PyTorch CPU path (slower, more memory).",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


def backend_info() -> dict:
    """Which backends are active here, and why any is not."""
    triton_err = _triton_import_error()
    cuda = torch.cuda.is_available()
    info = {
        "triton": triton_err is None and cuda and not triton_interpreting(),
        "triton_interpret": triton_err is None and triton_interpreting(),
        "cpu_ext": cpu_ext_available(),
        "torch": True,
        "why_not": {},
    }
    if not info["triton"]:
        info["why_not"]["triton"] = triton_err or ("no CUDA device" if not cuda else "TRITON_INTERPRET=1 is set")
    if not info["triton_interpret"]:
        info["why_not"]["triton_interpret"] = triton_err or "TRITON_INTERPRET=1 is not set"
    if not info["cpu_ext"]:
        info["why_not"]["cpu_ext"] = _cpu_ext_error
    return info


def cpu_op_available(name: str) -> bool:
    """The C++ extension is loaded and registers torch.ops.ladder_cpu.<name> (an extension built from older
    sources may lack a newer op)."""
    return cpu_ext_available() and hasattr(torch.ops.ladder_cpu, name)


def resolve_backend(device: torch.device, backend: str | None, op: str, cpu_op: str | None = None) -> str:
    """The backend an op call on `device` takes: `backend` if given (checked), else the fastest usable one.
    cpu_op: the ladder_cpu op the "cpu" backend calls (default: `op`)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
    cpu_op = cpu_op or op
    if backend is None:
        if device.type == "cuda":
            return "triton" if _triton_import_error() is None else "torch"
        if device.type == "cpu":
            return "cpu" if cpu_op_available(cpu_op) else "torch"
        return "torch"
    if backend == "triton":
        if _triton_import_error() is not None:
            raise RuntimeError(f"{op}: backend='triton' unavailable: {_triton_import_error()}")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError(f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {device}")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got device {device}")
        if not cpu_ext_available():
            raise RuntimeError(f"{op}: backend='cpu' unavailable: {_cpu_ext_error}")
        if not cpu_op_available(cpu_op):
            raise RuntimeError(f"{op}: backend='cpu' unavailable: the C++ extension has no ladder_cpu::{cpu_op} (rebuild it)")
    return backend
