"""Does fine-tuning model X fit my GPU? `ladder_kernels.plan` answers without weights or a GPU: it runs each
method's real training step on fake tensors and reports the peak memory, its breakdown, and the longest
context that fits.

    python python/plan_memory.py --model llama-2-7b --gpu-memory 12GB --seq-len 2048
    python python/plan_memory.py --model /path/to/checkpoint --gpu-memory 24GB --methods ladder,qlora-ckpt

The same answer, as a table, from the command line: `ladder-kernels plan --model llama-2-7b`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    import ladder_kernels as lk
    from ladder_kernels.planning.planner import plan_with_max_seq_len, shipped_models
    from ladder_kernels.units import parse_bytes

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="llama-2-7b",
        help=f"a shipped config ({', '.join(shipped_models())}), a config.json or a checkpoint folder",
    )
    p.add_argument("--gpu-memory", default="12GB", help="the GPU's memory, e.g. 12GB or 24GiB")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--methods", default="ladder,qlora", help="comma-separated: ladder, xladder, qlora, qlora-ckpt")
    p.add_argument("--no-max-context", action="store_true", help="skip the longest-context search (faster)")
    args = p.parse_args(argv)
    gpu = parse_bytes(args.gpu_memory)

    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if args.no_max_context:
            result, longest = lk.plan(args.model, method, seq_len=args.seq_len, batch_size=args.batch_size), None
        else:
            result, longest = plan_with_max_seq_len(
                args.model, gpu, method, seq_len=args.seq_len, batch_size=args.batch_size
            )
        verdict = "fits" if result.fits(gpu) else "does NOT fit"
        print(
            f"{method:>10}: peak {result.peak_gib:6.2f} GiB, needs {result.required_bytes / 2**30:6.2f} GiB -> "
            f"{verdict} "
            f"in {args.gpu_memory}" + ("" if longest is None else f"; longest context that fits: {longest or 'none'}")
        )
        for part, n in result.breakdown.items():
            print(f"{'':12}{part:<18} {n / 2**30:6.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
