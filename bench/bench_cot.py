"""xLadder vs Ladder on `arith` by answer format (`ladder-kernels bench --cot`; the same options).

The full table, on the easy problem set at 300 optimizer steps (100 batches x 3 cached passes for Ladder / xLadder):
about 3 minutes a `none` run and 5-6 a `full` one on 2 AVX-512-BF16 cores; bf16 is ~80x slower than fp32 on CPUs
without native bf16, so use --dtype fp32 there:
    .venv/bin/python bench/bench_cot.py
The runs recorded in bench/results/cot_*.md: see the command in each.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from ladder_kernels.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["--cot", *sys.argv[1:]]))
