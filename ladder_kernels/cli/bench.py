"""`ladder-kernels bench` (and bench/bench_e2e.py): Ladder, xLadder and QLoRA variants trained side by side on the
same models, inputs and machine: peak memory, tokens/s, loss (ladder_kernels.planning.bench)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from ladder_kernels.defaults import (
    ACCURACY_METHODS,
    ARITH_LEVELS,
    BENCH_STEPS,
    BENCH_WARMUP,
    COT_FORMATS,
    DTYPE_ALIASES,
    METHODS,
    dtype_from_name,
)
from ladder_kernels.errors import INPUT_ERRORS, ConfigError
from ladder_kernels.planning.accuracy_bench import AccuracyBenchSettings, run_accuracy_bench, write_accuracy_results
from ladder_kernels.planning.bench import TINY_CONFIGS, BenchSettings, run_bench
from ladder_kernels.planning.bench_report import write_results
from ladder_kernels.planning.cot_bench import CotBenchSettings, run_cot_bench, write_cot_results

DESCRIPTION = (
    "End-to-end benchmark: Ladder, xLadder and QLoRA variants trained side by side on the same models, inputs "
    "and machine."
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--methods",
        type=_names,
        default=None,
        help=f"comma-separated, from {', '.join(METHODS)} (default: all); with --accuracy from "
        f"{', '.join(ACCURACY_METHODS)} (default: all)",
    )
    p.add_argument(
        "--models",
        type=_names,
        default=None,
        help=f"comma-separated: {', '.join(TINY_CONFIGS)}, smollm2, a shipped config (random weights) or a checkpoint "
        "folder (default: tiny-llama,smollm2 on CPU; llama-1b,llama-2-7b on GPU)",
    )
    p.add_argument(
        "--seq-lens", type=_ints, default=None, help="comma-separated (default: 256..2048 on CPU, 512..8192 on GPU)"
    )
    p.add_argument("--batch-sizes", type=_ints, default=(1,), help="comma-separated (default 1)")
    p.add_argument(
        "--steps",
        type=int,
        default=BENCH_STEPS,
        help=f"timed steps per method and cell after the warm-up; the table shows their median (default {BENCH_STEPS})",
    )
    p.add_argument(
        "--warmup", type=int, default=BENCH_WARMUP, help=f"untimed rounds per cell first (default {BENCH_WARMUP})"
    )
    p.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the methods of a cell take turns within each round, so that a busy machine slows them alike "
        "(default: on CPU; on CUDA each method runs alone, as all of a cell's models may not fit at once)",
    )
    p.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        metavar="CSV",
        help="an earlier run's e2e_<tag>.csv: the table then shows how far each cell's speed ratio to qlora moved",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--out-dir", default="bench/results", help="where results go (default bench/results)")
    p.add_argument("--tag", default=None, help="output name suffix: e2e_<tag>.csv ... (default: the device)")
    p.add_argument("--plan", action="store_true", help="also record the memory planner's prediction per cell")
    cot = p.add_argument_group(
        "--cot: xLadder vs Ladder on arith by answer format (fine-tuning runs; uses --models' first, --dtype, "
        "--out-dir, --tag)"
    )
    cot.add_argument(
        "--cot",
        action="store_true",
        help="run the answer-format bench: ladder and xladder at equal parameters and steps per --cot format, "
        "3 seeds, qlora once; cot_<tag>.csv/.md/.png",
    )
    cot.add_argument(
        "--formats", type=_names, default=COT_FORMATS, help=f"comma-separated from {', '.join(COT_FORMATS)}"
    )
    cot.add_argument(
        "--arith-level",
        choices=ARITH_LEVELS,
        default=CotBenchSettings.level,
        help=f"the arith problem set (finetune --arith-level; default {CotBenchSettings.level})",
    )
    cot.add_argument("--depths", type=_ints, default=(4, 8), help="xladder δ values (default 4,8)")
    cot.add_argument(
        "--seeds",
        type=_ints,
        default=(0, 1, 2),
        help="seeds per ladder / xladder cell (--accuracy: per cell; default 0,1,2)",
    )
    cot.add_argument(
        "--train-steps",
        type=int,
        default=CotBenchSettings.steps,
        help=f"optimizer steps per run (default {CotBenchSettings.steps})",
    )
    cot.add_argument(
        "--train-batch",
        type=int,
        default=None,
        help=f"examples per step (default {CotBenchSettings.batch_size}; --accuracy: finetune's default)",
    )
    cot.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help=f"held-out examples per run (default {CotBenchSettings.eval_samples}; --accuracy "
        f"{AccuracyBenchSettings.eval_samples})",
    )
    cot.add_argument(
        "--equal-time-format", default="none", help="format also run at equal training wall time ('' for none)"
    )
    cot.add_argument("--no-qlora", action="store_true", help="leave out the QLoRA reference runs")
    cot.add_argument(
        "--runs-dir",
        default=None,
        help=f"run folders; finished cells are not rerun (default {CotBenchSettings.runs_dir}; --accuracy "
        f"{AccuracyBenchSettings.runs_dir})",
    )
    cot.add_argument(
        "--collect",
        action="store_true",
        help="write the tables from the finished cells in --runs-dir; train nothing (also --accuracy)",
    )
    acc = p.add_argument_group(
        "--accuracy: held-out accuracy against training wall time and FLOPs on the embedded sentiment task "
        "(fine-tuning runs; uses --methods, --models' first, --seq-lens' first, --dtype, --seeds, --train-batch, "
        "--eval-samples, --runs-dir, --collect, --out-dir, --tag)"
    )
    acc.add_argument(
        "--accuracy",
        action="store_true",
        help="run the accuracy bench: ladder, ladder-cache, xladder and qlora at each --budgets, per seed; "
        "accuracy_<tag>.csv/.md/.png with the fitted loss-vs-FLOPs slope per method",
    )
    acc.add_argument(
        "--budgets",
        type=_ints,
        default=AccuracyBenchSettings.budgets,
        help="optimizer steps of one pass over the data per cell (default "
        f"{','.join(map(str, AccuracyBenchSettings.budgets))})",
    )
    acc.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"ladder-cache's passes over the same examples (default {AccuracyBenchSettings.epochs}); --cot: "
        f"ladder and xladder take --train-steps / E batches E times from the backbone-state cache (default "
        f"{CotBenchSettings.epochs})",
    )


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    return BenchSettings(
        methods=args.methods or METHODS,
        models=args.models or (("llama-1b", "llama-2-7b") if gpu else ("tiny-llama", "smollm2")),
        seq_lens=args.seq_lens or ((512, 1024, 2048, 4096, 8192) if gpu else (256, 512, 1024, 2048)),
        batch_sizes=args.batch_sizes,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        dtype=dtype_from_name(args.dtype),
        out_dir=Path(args.out_dir),
        tag=args.tag,
        with_plan=args.plan,
        interleave=args.interleave,
    )


def cot_settings_from_args(args: argparse.Namespace) -> CotBenchSettings:
    return CotBenchSettings(
        model=(args.models or ("embedded",))[0],
        formats=args.formats,
        depths=args.depths,
        seeds=args.seeds,
        steps=args.train_steps,
        epochs=CotBenchSettings.epochs if args.epochs is None else args.epochs,
        level=args.arith_level,
        batch_size=args.train_batch or CotBenchSettings.batch_size,
        seq_len=(args.seq_lens or (CotBenchSettings.seq_len,))[0],
        eval_samples=args.eval_samples or CotBenchSettings.eval_samples,
        dtype=DTYPE_ALIASES[args.dtype],
        qlora=not args.no_qlora,
        equal_time_format=args.equal_time_format or None,
        out_dir=Path(args.out_dir),
        runs_dir=Path(args.runs_dir or CotBenchSettings.runs_dir),
        tag=args.tag or "smollm2",
    )


def accuracy_settings_from_args(args: argparse.Namespace) -> AccuracyBenchSettings:
    return AccuracyBenchSettings(
        model=(args.models or ("embedded",))[0],
        methods=args.methods or ACCURACY_METHODS,
        budgets=args.budgets,
        epochs=AccuracyBenchSettings.epochs if args.epochs is None else args.epochs,
        seeds=args.seeds,
        eval_samples=args.eval_samples or AccuracyBenchSettings.eval_samples,
        batch_size=args.train_batch,
        seq_len=(args.seq_lens or (None,))[0],
        dtype=DTYPE_ALIASES[args.dtype],
        out_dir=Path(args.out_dir),
        runs_dir=Path(args.runs_dir or AccuracyBenchSettings.runs_dir),
        tag=args.tag or AccuracyBenchSettings.tag,
    )


def _finetune_bench(name: str, args: argparse.Namespace, settings_of, run, write) -> int:
    """`bench --cot` / `--accuracy`: its cells trained (or, with --collect, only the finished ones read), then its
    result files written."""
    try:
        settings = settings_of(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    rows = run(settings, write=not args.collect, train=not args.collect)
    if not rows:
        raise ConfigError(f"bench --{name} --collect: no finished cell in {settings.runs_dir}")
    for path in write(rows, settings.out_dir, settings.tag, settings.command):
        print(path)
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    if args.cot and args.accuracy:
        raise ConfigError("bench: --cot and --accuracy are two benches; give one")
    if args.accuracy:
        return _finetune_bench(
            "accuracy", args, accuracy_settings_from_args, run_accuracy_bench, write_accuracy_results
        )
    if args.cot:
        return _finetune_bench("cot", args, cot_settings_from_args, run_cot_bench, write_cot_results)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.compare_with is not None and not args.compare_with.is_file():
        raise ConfigError(f"--compare-with: no such file {args.compare_with}")
    rows = run_bench(settings)
    for path in write_results(rows, settings.out_dir, settings.tag, compare_with=args.compare_with):
        print(path)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark Ladder / xLadder against QLoRA: peak memory, tokens/s, loss", description=DESCRIPTION
    )
    add_arguments(p)
    p.set_defaults(func=run_bench_command)


def main(argv: Optional[list[str]] = None) -> int:
    """bench/bench_e2e.py: the same options as `ladder-kernels bench`."""
    parser = argparse.ArgumentParser(prog="bench_e2e", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_bench_command(args)
    except INPUT_ERRORS as exc:
        print(f"bench_e2e: error: {exc}", file=sys.stderr)
        return 2
