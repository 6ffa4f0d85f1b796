"""End-to-end benchmark, Ladder / xLadder against QLoRA (same options as `ladder-kernels bench`).

CPU sweep recorded in bench/results/e2e_cpu.*:
    .venv/bin/python bench/bench_e2e.py --models tiny-llama,smollm2 --seq-lens 256,512,1024,2048 --steps 2 --plan
GPU (random-initialised 1B / 7B shapes):
    python bench/bench_e2e.py --models llama-1b,llama-2-7b --seq-lens 512,1024,2048,4096,8192
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from ladder_kernels.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
