"""End-to-end benchmark, Ladder / xLadder against QLoRA (same options as `ladder-kernels bench`).

CPU speed comparison recorded in bench/results/e2e_cpu.* (two runs, the second compared with the first; on CPU the
methods of a cell take turns within each round, median of 10 timed steps):
    .venv/bin/python bench/bench_e2e.py --models tiny-llama --seq-lens 256,1024 --dtype fp32 --tag cpu_run1
    .venv/bin/python bench/bench_e2e.py --models tiny-llama --seq-lens 256,1024 --dtype fp32 --tag cpu \
        --compare-with bench/results/e2e_cpu_run1.csv
CPU memory sweep (bench/results/e2e_cpu_bf16.*; its memory columns are deterministic):
    .venv/bin/python bench/bench_e2e.py --models tiny-llama,smollm2 --seq-lens 256,512,1024,2048 --plan
GPU (random-initialised 1B / 7B shapes):
    python bench/bench_e2e.py --models llama-1b,llama-2-7b --seq-lens 512,1024,2048,4096,8192
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from ladder_kernels.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
