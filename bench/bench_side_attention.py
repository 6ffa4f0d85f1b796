"""Side-network attention on CPU: `ops.causal_attention` (csrc/causal_attention.cpp) against torch's
`F.scaled_dot_product_attention` (causal, grouped-query; CPU flash attention), forward + backward, at the side's
small head dims. The methods take turns within each round; the median time of a round's call is reported,
min–max beside it, and its ratio to SDPA in fp32 (what the side ran before; its q, k, v are fp32 on CPU).

    python bench/bench_side_attention.py [--rounds 15] [--out-dir bench/results]
writes bench/results/side_attention_cpu.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: a shared CPU's spinning threads are noise

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ladder_kernels.io import write_text_atomic  # noqa: E402
from ladder_kernels.ops.causal_attention import causal_attention  # noqa: E402
from ladder_kernels.planning.bench import command_line, library_versions  # noqa: E402

# (heads, kv_heads, T, head_dim): the step bench's side (width 64 = 8 heads of 8), a GQA side (a 7B backbone at r = 8
# has head_dim 16), wider heads, a longer sequence
SHAPES = [(8, 8, 1024, 8), (8, 2, 1024, 16), (8, 8, 1024, 32), (8, 8, 2048, 8)]


def sdpa(dtype):
    def run(q, k, v):
        q, k, v = (t.to(dtype) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    return run


METHODS = {"sdpa fp32": sdpa(torch.float32), "sdpa bf16": sdpa(torch.bfloat16), "ladder": causal_attention}


def time_call(fn, q, k, v, grad_out) -> float:
    for t in (q, k, v):
        t.grad = None
    start = time.perf_counter()
    fn(q, k, v).float().backward(grad_out)
    return time.perf_counter() - start


def measure(rounds: int) -> dict:
    results = {}
    for H, KV, T, hd in tqdm(SHAPES, desc="shapes", unit="shape"):
        q = torch.randn(1, H, T, hd, requires_grad=True)
        k, v = (torch.randn(1, KV, T, hd, requires_grad=True) for _ in range(2))
        grad_out = torch.randn(q.shape)
        times = {name: [] for name in METHODS}
        for r in range(rounds + 1):  # round 0 warms up
            for name, fn in METHODS.items():
                elapsed = time_call(fn, q, k, v, grad_out)
                if r:
                    times[name].append(elapsed)
        results[(H, KV, T, hd)] = times
    return results


def report(results: dict, rounds: int, command: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        "# Side attention, forward + backward, CPU",
        "",
        f"Batch 1, causal; {torch.get_num_threads()} threads; {rounds} rounds, the methods in turns within each; "
        "ms = median (min–max) of one forward + backward; × = against SDPA fp32.  ",
        f"Command: `{command}`  ",
        f"Versions: {library_versions()}  ",
        f"Run: {stamp}",
        "",
        "| heads / kv heads | T | head_dim | " + " | ".join(f"{m} ms" for m in METHODS) + " | ladder × sdpa fp32 |",
        "|---|---|---|" + "---|" * (len(METHODS) + 1),
    ]
    for (H, KV, T, hd), times in results.items():
        med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
        cells = [f"{med[m]:.1f} ({min(t) * 1e3:.1f}–{max(t) * 1e3:.1f})" for m, t in times.items()]
        ratio = med["ladder"] / med["sdpa fp32"]
        lines.append(f"| {H} / {KV} | {T} | {hd} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (each method runs once per round)")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    markdown = report(measure(args.rounds), args.rounds, command_line())
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "side_attention_cpu.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
