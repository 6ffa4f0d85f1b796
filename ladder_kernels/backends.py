"""Which compute backends are usable here, and the kernel registry: which implementation an op call takes.

Backends (one name each, as ops and LadderConfig.backend take them):
  triton  compiled Triton kernels on CUDA tensors (ladder_kernels/kernels/triton/), or run by Triton's CPU
          interpreter under TRITON_INTERPRET=1 (tests)
  cpu     the C++ kernels in csrc/, registered as torch.ops.ladder_cpu.* (ladder_kernels/kernels/cpu.py)
  torch   the pure-PyTorch references in ladder_kernels/ops/, always available (the oracle of the tests)

Each backend module declares its kernels (`KERNELS`, `load_kernel(name)`); the ops register their reference
implementations with `register_reference`. `kernel(name, backend)` loads an implementation lazily, once.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Callable

import torch
from torch import Tensor

from ladder_kernels.defaults import BACKENDS, CPU_BF16_ENV

# backend -> module declaring KERNELS and load_kernel (imported on first use: triton needs a driver to launch)
BACKEND_MODULES = {"triton": "ladder_kernels.kernels.triton", "cpu": "ladder_kernels.kernels.cpu"}
_REFERENCES: dict[str, Callable] = {}


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


def _cpu():
    return importlib.import_module(BACKEND_MODULES["cpu"])


def register_reference(name: str):
    """Decorator: `fn` is the torch backend of kernel `name` (the reference the other backends are tested against)."""

    def register(fn: Callable) -> Callable:
        _REFERENCES[name] = fn
        return fn

    return register


@functools.cache
def _load(name: str, backend: str) -> Callable:
    return importlib.import_module(BACKEND_MODULES[backend]).load_kernel(name)


def kernel(name: str, backend: str) -> Callable:
    """The implementation of kernel `name` on `backend` ("triton", "cpu" or "torch")."""
    if backend == "torch":
        return _REFERENCES[name]
    if backend not in BACKEND_MODULES:
        raise ValueError(f"kernel {name}: backend must be one of {BACKENDS}, got {backend!r}")
    return _load(name, backend)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512-BF16 or AMX-BF16): there bf16 matmuls run about 3x faster
    than fp32 (measured: 377 against 128 GFLOP/s, 2 cores of an AMD EPYC with AVX-512-BF16); without it they are
    emulated, tens of times slower than fp32. defaults.CPU_BF16_ENV ("0"/"1") overrides what the CPU says."""
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"{CPU_BF16_ENV} must be 0 or 1 (or unset), got {forced!r}")
    return forced == "1" if forced else _cpu_reports_bf16()


@functools.cache
def _cpu_reports_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's, private: absent means no
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def backend_info() -> dict:
    """Which backends are active here, and why any is not (the C++ extension is loaded on first call). With the
    C++ backend: `cpu_library`, the file loaded, and `cpu_isa`, the NF4 kernels' instruction set ("avx512",
    "avx2" or "scalar"; the environment variable defaults.CPU_ISA_ENV forces one). `cpu_native_bf16`: whether
    finetune's --matmul-dtype auto multiplies the backbone's 4-bit layers in bf16 on this CPU."""
    triton_err = _triton_import_error()
    cuda = torch.cuda.is_available()
    info = {
        "triton": triton_err is None and cuda and not triton_interpreting(),
        "triton_interpret": triton_err is None and triton_interpreting(),
        "cpu": _cpu().available(),
        "torch": True,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "why_not": {},
    }
    if not info["triton"]:
        info["why_not"]["triton"] = triton_err or ("no CUDA device" if not cuda else "TRITON_INTERPRET=1 is set")
    if not info["triton_interpret"]:
        info["why_not"]["triton_interpret"] = triton_err or "TRITON_INTERPRET=1 is not set"
    if not info["cpu"]:
        info["why_not"]["cpu"] = _cpu().why_unavailable()
    else:  # which C++ library is loaded, and which of its NF4 code paths a call takes now
        info["cpu_library"] = _cpu().library_path()
        try:
            info["cpu_isa"] = _cpu().isa()
        except RuntimeError as exc:  # LADDER_KERNELS_CPU_ISA names what this CPU cannot run
            info["cpu_isa"] = f"error: {str(exc).splitlines()[0]}"
    return info


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def is_plain_call(*tensors) -> bool:
    """Whether an op called on `tensors` (None entries allowed) needs none of its torch.library custom op: no
    autograd, no tracing, no fake tensors or dispatch modes. Then the op may call its kernel directly; the custom
    op's dispatch costs about 35 us a call, most of a decode-sized matmul (8 ms per generated SmolLM2 token)."""
    needs_grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and ((needs_grad and t.requires_grad) or type(t) not in _PLAIN_TENSOR_TYPES):
            return False  # needs autograd, or a subclass (DTensor, fake tensors) that must see the op
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


# torch.compile: a pure function of constants (what is installed and loaded is fixed for the process); dynamo
# runs it while tracing and keeps the result, rather than tracing the cached file-system checks it makes
@torch.compiler.assume_constant_result
def resolve_backend(device: torch.device, backend: str | None, op: str, kernel_name: str) -> str:
    """The backend an op call on `device` takes: `backend` if given (checked), else the fastest usable one for
    kernel `kernel_name`. Memoised (it ran ~14 us a call, a fifth of a decode-sized matmul); whether
    TRITON_INTERPRET is set (tests switch it) is part of the key where it matters, with backend "triton"."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
    return _resolve_backend(device.type, backend, op, kernel_name, backend == "triton" and triton_interpreting())


@functools.cache
def _resolve_backend(device_type: str, backend: str | None, op: str, kernel_name: str, interpreting: bool) -> str:
    if backend is None:
        if device_type == "cuda":
            return "triton" if _triton_import_error() is None else "torch"
        if device_type == "cpu":
            return "cpu" if _cpu().has_kernel(kernel_name) else "torch"
        return "torch"
    if backend == "triton":
        if _triton_import_error() is not None:
            raise RuntimeError(f"{op}: backend='triton' unavailable: {_triton_import_error()}")
        if device_type == "cpu" and not interpreting:
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {device_type}"
            )
    if backend == "cpu":
        if device_type != "cpu":
            raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got device {device_type}")
        try:
            _cpu().load_kernel(kernel_name)
        except RuntimeError as exc:
            raise RuntimeError(f"{op}: {exc}") from None
    return backend
