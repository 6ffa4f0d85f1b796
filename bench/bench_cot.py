"""xLadder vs Ladder on `arith` by answer format (`ladder-kernels bench --cot`; the same options).

The full table (hours on 2 CPU cores; bf16 is ~80x slower than fp32 on CPUs without AVX-512, so use --dtype fp32
there):
    .venv/bin/python bench/bench_cot.py --dtype fp32
The reduced run recorded in bench/results/cot_smollm2.*: see the command in cot_smollm2.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from ladder_kernels.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["--cot", *sys.argv[1:]]))
