"""Peak tensor memory without a GPU: a dispatch-mode tracker of live tensor storages, and process RSS.

`PeakMemoryTracker` sees every aten op's outputs (custom ops as one op: their internal temporaries are not
seen, the same under real and fake tensors). Each storage is counted once, from the op that allocated it
until it is freed (a weakref finalizer on the storage). Under `FakeTensorMode` with CPU-device fakes it
gives the same figures as real CPU tensors, which is what the memory planner relies on.

What it counts: bytes of tensor storages (`nbytes`; meta tensors hold none). Not: allocator rounding, the
CUDA context, cuBLAS workspaces, memory held by kernels outside the dispatcher (bitsandbytes' C calls, C++
scratch buffers).
"""

from __future__ import annotations

import os
import re
import resource
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

_LIFT_OPS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift.default)

__all__ = [
    "PeakMemoryTracker",
    "peak_memory_bytes",
    "process_peak_rss_bytes",
    "process_rss_bytes",
    "reset_peak_memory",
    "tensor_storages",
]


def tensor_storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The untyped storages behind a tensor (a wrapper subclass has one per inner tensor)."""
    pending, storages = [t], []
    while pending:
        obj = pending.pop()
        if is_traceable_wrapper_subclass(obj):
            attrs, _ = obj.__tensor_flatten__()
            pending.extend(getattr(obj, a) for a in attrs if isinstance(getattr(obj, a), torch.Tensor))
        else:
            storages.append(obj.untyped_storage())
    return storages


def _quant_state_tensors(state) -> Iterable[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState (absmax, code, offset, nested state): weights that are
    neither parameters nor buffers."""
    while state is not None:
        yield from (
            t
            for t in (getattr(state, name, None) for name in ("absmax", "code", "offset"))
            if isinstance(t, torch.Tensor)
        )
        state = getattr(state, "state2", None)


def _tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    """Tensors held by a tensor, a module (parameters with their bitsandbytes quant states, buffers), an
    optimizer (state) or a container of them."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        for p in obj.parameters():
            yield p
            yield from _quant_state_tensors(getattr(p, "quant_state", None))
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            yield from _tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item)
    else:
        raise TypeError(
            "PeakMemoryTracker.track: expected tensors, modules, optimizers or containers of them, got "
            f"{type(obj).__name__}"
        )


class PeakMemoryTracker(TorchDispatchMode):
    """Context manager: bytes of live tensor storages allocated while it is active, and their peak.

    Only storages created by ops inside the context are counted (plus whatever `track()` adds), so the
    figures are relative to a baseline of everything that existed before. Reading:
      current_bytes   bytes of tracked storages alive now (also valid after exit: frees keep counting)
      peak_bytes      the largest current_bytes seen since entry or the last `reset_peak()`
    Categories: each storage is filed, when it is first seen, under `classify(tensor)` if that returns a
    name, else under `.category` (set it as the work moves on: "forward", "backward", ...).
      current_by_category   live bytes per category now
      peak_by_category      live bytes per category at the moment of the peak (sums to peak_bytes)
    Example:
        with PeakMemoryTracker() as mem:
            loss = model(x).loss; loss.backward()
        print(mem.peak_bytes)
    """

    def __init__(
        self, classify: Optional[Callable[[torch.Tensor], Optional[str]]] = None, category: str = "other"
    ) -> None:
        super().__init__()
        if classify is not None and not callable(classify):
            raise TypeError(f"PeakMemoryTracker: classify must be a callable or None, got {type(classify).__name__}")
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[int, str]] = {}  # id(storage) -> (bytes, category); gone when freed
        self._classify = classify
        self.category = category
        self.current_bytes = 0
        self.peak_bytes = 0
        self.current_by_category: dict[str, int] = {}
        self.peak_by_category: dict[str, int] = {}

    # --- public ------------------------------------------------------------------------------------------
    def reset_peak(self) -> None:
        """Start a new peak from the current live bytes."""
        self.peak_bytes = self.current_bytes
        self.peak_by_category = dict(self.current_by_category)

    def track(self, *objs: Any, category: Optional[str] = None) -> int:
        """Count storages that already exist (a model's weights, an optimizer's state) as live, under
        `category` (default: the current one). Returns the bytes newly added; a storage counts once."""
        before = self.current_bytes
        for obj in objs:
            for t in _tensors_in(obj):
                if t.device.type == "meta":
                    continue
                for st in tensor_storages(t):
                    self._add(st, category or self.category)
        self._update_peak()
        return self.current_bytes - before

    def is_tracked(self, t: torch.Tensor) -> bool:
        return all(id(st) in self._entries for st in tensor_storages(t))

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    # --- bookkeeping -------------------------------------------------------------------------------------
    def _add(self, st: torch.UntypedStorage, category: str) -> None:
        key, nbytes = id(st), st.nbytes()
        with self._lock:
            if key in self._entries:
                # a tracked storage resized in place (resize_, set_): count its new size where it was filed
                old, category = self._entries[key]
                self._entries[key] = (nbytes, category)
                self._count(category, nbytes - old)
                return
            self._entries[key] = (nbytes, category)
            self._count(category, nbytes)
        # the Python storage object lives as long as the C++ storage does, so this fires when it is freed
        weakref.finalize(st, self._on_free, key)

    def _count(self, category: str, delta: int) -> None:
        self.current_bytes += delta
        self.current_by_category[category] = self.current_by_category.get(category, 0) + delta

    def _on_free(self, key: int) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._count(entry[1], -entry[0])

    def _update_peak(self) -> None:
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.peak_by_category = dict(self.current_by_category)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a storage that was already an input's and is not tracked predates the context (a view or an
        # in-place update of an outside tensor): it is part of the baseline, not an allocation. Except
        # lift_fresh: torch.tensor(data) builds its storage outside the dispatcher and hands it over here.
        if func in _LIFT_OPS:
            input_storages = set()
        else:
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            input_storages = {id(st) for t in inputs for st in tensor_storages(t)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":  # meta tensors hold no memory
                category = None
                for st in tensor_storages(t):
                    if id(st) in self._entries or id(st) not in input_storages:
                        if category is None:
                            category = (self._classify(t) if self._classify else None) or self.category
                        self._add(st, category)
        self._update_peak()
        return out


def process_rss_bytes() -> int:
    """This process's resident set size now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def process_peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    ru_maxrss (KiB on Linux, bytes on macOS) is updated lazily by the kernel, so it can trail the RSS of
    the moment by a few pages: the larger of the two is the peak.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak if sys.platform == "darwin" else peak * 1024, process_rss_bytes())


def _release_free_heap() -> None:
    """Hands glibc's free heap pages back to the OS (malloc_trim), so that RSS counts live memory only: freed
    tensors under the mmap threshold stay in the heap, and a run after another in one process (the accuracy
    bench's cells) would otherwise start its peak from the earlier run's high-water mark."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator peak, or on Linux the process's peak RSS (VmHWM) via clear_refs, from
    the live memory of the moment (free heap pages returned to the OS first)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the peak counts from process start


def peak_memory_bytes() -> int:
    """The peak since reset_peak_memory: CUDA's allocator peak, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        return process_peak_rss_bytes()
