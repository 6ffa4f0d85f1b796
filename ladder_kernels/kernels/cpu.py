"""The C++ CPU backend: csrc/*.cpp registered as torch.ops.ladder_cpu.* (TORCH_LIBRARY(ladder_cpu)).

Loaded from the compiled ladder_kernels._C when it matches the installed torch, else built just-in-time with
ninja from the C++ sources (the checkout's csrc/, or the copy a wheel ships as ladder_kernels/csrc/), else
unavailable (ops fall back to the torch backend with one warning). LADDER_KERNELS_NO_CPU_EXT=1 switches it off.
"""

from __future__ import annotations

import functools
import glob
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

# kernel name (ladder_kernels.backends) -> op name in torch.ops.ladder_cpu
KERNELS = {
    "nf4_matmul": "nf4_matmul",
    "nf4_matmul_grad_input": "nf4_matmul_grad_input",
    "downproj": "downproj",
    "downproj_backward": "downproj_backward",
    "cross_entropy_rows": "cross_entropy_rows_",
    "causal_attention": "causal_attention",
    "causal_attention_backward": "causal_attention_backward",
}
_PACKAGE = Path(__file__).resolve().parent.parent
CSRC_DIRS = (_PACKAGE.parent / "csrc", _PACKAGE / "csrc")  # a source checkout, an installed wheel
# The baseline -march stays portable: the AVX2 / AVX-512 loops carry their own target attributes and are chosen at
# run time (csrc/nf4_matmul.cpp). -ffp-contract=off: no FMA fuses a product and a sum that the torch reference
# rounds separately (the nested absmax decode is then bit-identical to it). setup.py passes the same flags.
COMPILE_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"] + (
    ["-march=x86-64-v2"] if platform.machine() == "x86_64" else []
)
_load_error: str | None = None
_module = None  # the loaded extension module (ladder_kernels._C or the just-in-time build)


def _jit_build():
    """Build csrc/*.cpp with ninja into the user's cache dir (done once; torch caches by source hash)."""
    from torch.utils import cpp_extension

    csrc = next((d for d in CSRC_DIRS if d.is_dir()), None)
    if csrc is None:
        raise RuntimeError("the C++ sources (csrc/) are not shipped with this install")
    if (
        shutil.which("ninja") is None
    ):  # the `ninja` dependency installs into the env's bin/, on PATH only when activated
        try:
            import ninja

            ninja_dir = ninja.BIN_DIR
        except (ImportError, AttributeError):
            ninja_dir = os.path.dirname(sys.executable)
        os.environ["PATH"] = ninja_dir + os.pathsep + os.environ.get("PATH", "")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ladder_kernels" / "torch_ext"
    cache.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="ladder_kernels_C",
        sources=sorted(glob.glob(str(csrc / "*.cpp"))),
        extra_cflags=COMPILE_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(cache),
        is_python_module=True,
        verbose=False,
    )


def _compiled_is_stale() -> bool:
    """In a source checkout, a _C built before the latest csrc/ edit is stale: rebuild just-in-time instead."""
    built = list(_PACKAGE.glob("_C*.so"))
    sources = [p for pattern in ("*.cpp", "*.h") for p in CSRC_DIRS[0].glob(pattern)]
    return bool(built and sources) and max(s.stat().st_mtime for s in sources) > min(b.stat().st_mtime for b in built)


@functools.cache
def available() -> bool:
    """Load the C++ kernels: the compiled ladder_kernels._C, else a just-in-time build, else none."""
    global _load_error, _module
    if os.environ.get("LADDER_KERNELS_NO_CPU_EXT") == "1":
        _load_error = "disabled by LADDER_KERNELS_NO_CPU_EXT=1"
        return False
    if not _compiled_is_stale():
        try:
            from ladder_kernels import _C

            _module = _C
            return True
        except ImportError:  # not built, or built against another torch
            pass
    try:
        _module = _jit_build()
        return True
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _load_error = f"C++ extension not built and the just-in-time build failed: {first}"
        warnings.warn(
            f"ladder_kernels: {_load_error}. Falling back to the pure-PyTorch CPU path (slower, more memory).",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


def why_unavailable() -> str | None:
    return None if available() else _load_error


def library_path() -> str | None:
    """The file of the loaded extension (the compiled ladder_kernels._C or the just-in-time build), or None."""
    return getattr(_module, "__file__", None) if available() else None


def isa() -> str | None:
    """The instruction set the NF4 kernels take now ("avx512", "avx2" or "scalar": the CPU's best, or what the
    environment variable LADDER_KERNELS_CPU_ISA names), or None without the extension. Raises RuntimeError when
    that variable names something this CPU cannot run, or something unknown."""
    if not available():
        return None
    if not hasattr(_module, "cpu_isa"):  # an extension built from older sources
        return "unknown (rebuild the extension)"
    return _module.cpu_isa()


def has_kernel(name: str) -> bool:
    """The extension is loaded and registers the kernel (an extension built from older sources may lack one)."""
    return name in KERNELS and available() and hasattr(torch.ops.ladder_cpu, KERNELS[name])


def load_kernel(name: str):
    if not available():
        raise RuntimeError(f"backend 'cpu' unavailable: {_load_error}")
    if not has_kernel(name):
        raise RuntimeError(
            f"backend 'cpu' unavailable: the C++ extension has no ladder_cpu::{KERNELS.get(name, name)} (rebuild it)"
        )
    return getattr(torch.ops.ladder_cpu, KERNELS[name])
