"""Held-out accuracy against training wall time and FLOPs, with the loss-vs-FLOPs slope per method
(`ladder-kernels bench --accuracy`; the same options).

The full table (ladder, ladder-cache, xladder, qlora at 25, 50 and 100 steps, 3 seeds, 1000 held-out tweets: hours
on 2 CPU cores; bf16 is ~80x slower than fp32 on CPUs without AVX-512, so use --dtype fp32 there):
    .venv/bin/python bench/bench_accuracy.py --dtype fp32
Results: bench/results/accuracy_<tag>.csv, .md and .png; --collect rewrites them from the finished runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from ladder_kernels.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["--accuracy", *sys.argv[1:]]))
