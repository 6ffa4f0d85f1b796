"""CUDA timing for bench_nf4_matmul.py: what one call costs the GPU, with a cold L2 and no host overhead.

Each method is run `warmup` times (autotuning, compilation and lazy allocations happen there), then captured
once in a CUDA graph. Every timed call replays that graph right after a 512 MiB write that evicts the L2 (H200:
60 MB, so an 8 MB weight would otherwise stay resident from the previous call), between two CUDA events. The
flush keeps the GPU busy while the host enqueues the replay, so the events time the kernels alone. A method
that cannot be captured (a host sync inside, say) is called eagerly after the same flush, and said so on stderr.
Rounds interleave the methods, as the CPU timing does.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 512 * 2**20
DESCRIPTION = "CUDA graph per call, replayed after a 512 MiB L2 flush, CUDA events (bench/gpu_timing.py)"


def capture(name: str, fn: Callable[[], torch.Tensor], warmup: int) -> Optional[torch.cuda.CUDAGraph]:
    """`fn` warmed up on a side stream, then captured; None (with a note) if it cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager timing, reported
        torch.cuda.synchronize()
        why = f"{type(exc).__name__}: {exc}"
        print(f"note: {name}: no CUDA graph ({why}); timed eagerly after the flush", file=sys.stderr)
        return None
    return graph


def time_methods(methods: dict[str, Callable[[], torch.Tensor]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds of GPU time per call of each method, `repeats` interleaved rounds."""
    graphs = {name: capture(name, fn, warmup) for name, fn in methods.items()}
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush.zero_()
            start.record()
            graphs[name].replay() if graphs[name] is not None else fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}
