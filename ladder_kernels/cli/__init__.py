"""The `ladder-kernels` command: finetune, generate, evaluate, plan, bench.

Each subcommand's parser sets `func(args) -> exit code`. Input errors (missing file, malformed row, empty
dataset, unsupported model, an output folder holding another run) and a training run that cannot go on (a NaN/Inf
loss, out of GPU memory) print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import sys
import typing

# Subcommands that other modules add through their own register_cli(subparsers).
EXTERNAL_SUBCOMMANDS = ("ladder_kernels.cli.generate", "ladder_kernels.cli.evaluate", "ladder_kernels.planning.planner", "ladder_kernels.planning.bench")


def _arg_type(hint):
    """int, float, str or bool from a field's type hint (Optional[X] -> X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_finetune_parser(subparsers) -> None:
    """One option per FinetuneConfig field; defaults are None here so that explicitly given ones are known."""
    from ladder_kernels.train.run import FinetuneConfig, flag

    p = subparsers.add_parser("finetune", help="fine-tune a model with Ladder / xLadder (or QLoRA) and evaluate it",
                              description="Fine-tune with Ladder Side Tuning on a frozen NF4 backbone, evaluating held-out "
                                          "accuracy before and after. Defaults: SmolLM2-135M-Instruct on tweet sentiment. "
                                          "Under torchrun / accelerate launch it runs data-parallel (DDP; rank 0 evaluates and "
                                          "writes the run folder).")
    hints = typing.get_type_hints(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        choices = f.metadata.get("choices")
        text = f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else "")
        if _arg_type(hints[f.name]) is bool:  # --x / --no-x
            p.add_argument(flag(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text)
            continue
        p.add_argument(flag(f.name), dest=f.name, default=None, type=_arg_type(hints[f.name]), choices=choices,
                       metavar=None if choices else f.name.upper(), help=text)
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.set_defaults(func=run_finetune_command)


def given_options(args: argparse.Namespace) -> dict:
    """The finetune options given on the command line (the others are None), by FinetuneConfig field name."""
    from ladder_kernels.train.run import FinetuneConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig) if getattr(args, f.name) is not None}


def run_finetune_command(args: argparse.Namespace) -> int:
    from ladder_kernels.train.run import FinetuneConfig, TrainingRun, distributed_from_env, resume_config

    explicit = given_options(args)
    cfg = resume_config(explicit.get("output_dir"), explicit) if args.resume else FinetuneConfig(**explicit)
    with distributed_from_env():  # data-parallel under torchrun / accelerate launch
        summary = TrainingRun(cfg, resume=args.resume).run()
    return 0 if summary["steps"] > 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ladder-kernels", description="Ladder Side Tuning / xLadder fine-tuning on a frozen 4-bit backbone.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_finetune_parser(subparsers)
    for module_name in EXTERNAL_SUBCOMMANDS:
        if importlib.util.find_spec(module_name) is not None:  # plan / bench land with their own issue
            importlib.import_module(module_name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ladder_kernels.train.run import INPUT_ERRORS

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except INPUT_ERRORS as exc:
        print(f"ladder-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nladder-kernels {args.command}: interrupted (a finetune run continues from its last checkpoint with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
