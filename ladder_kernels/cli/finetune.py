"""`ladder-kernels finetune`: the FinetuneConfig fields as options (ladder_kernels.train)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ladder_kernels.defaults import choices_of, literal_fields
from ladder_kernels.errors import ConfigError
from ladder_kernels.train.budget import fit_to_budget
from ladder_kernels.train.config import FinetuneConfig, flag
from ladder_kernels.train.distributed import distributed_from_env
from ladder_kernels.train.run import TrainingRun
from ladder_kernels.train.run_dir import resume_config


def _arg_type(hint):
    """int, float, str or bool from a field's type hint (Optional[X] -> X; a Literal -> its values' type)."""
    choices = choices_of(hint)
    if choices:
        return type(choices[0])
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def register(subparsers) -> None:
    """One option per FinetuneConfig field; defaults are None here so that explicitly given ones are known."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model with Ladder / xLadder (or QLoRA) and evaluate it",
        description="Fine-tune with Ladder Side Tuning on a frozen NF4 backbone, evaluating held-out "
        "accuracy before and after. Defaults: SmolLM2-135M-Instruct on tweet sentiment. "
        "Under torchrun / accelerate launch it runs data-parallel (DDP; rank 0 evaluates and "
        "writes the run folder).",
    )
    hints = typing.get_type_hints(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        choices = literal_fields(FinetuneConfig).get(f.name)
        text = f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else "")
        text = text.replace("%", "%%")  # argparse %-formats help strings ("within 5%")
        if _arg_type(hints[f.name]) is bool:  # --x / --no-x
            p.add_argument(flag(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text)
            continue
        p.add_argument(
            flag(f.name),
            dest=f.name,
            default=None,
            type=_arg_type(hints[f.name]),
            choices=choices,
            metavar=None if choices else f.name.upper(),
            help=text,
        )
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="print the settings --gpu-memory chooses (or, without it, the planned peak of the settings given) and "
        "exit without loading weights; --model may then name a shipped config (llama-2-7b, llama-2-13b, ...)",
    )
    p.set_defaults(func=run_finetune_command)


def given_options(args: argparse.Namespace) -> dict:
    """The finetune options given on the command line (the others are None), by FinetuneConfig field name."""
    return {
        f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig) if getattr(args, f.name) is not None
    }


def run_finetune_command(args: argparse.Namespace) -> int:
    explicit = given_options(args)
    if args.plan_only:
        if args.resume:
            raise ConfigError("--plan-only plans a new run; it does not combine with --resume")
        fit = fit_to_budget(FinetuneConfig(**explicit), set(explicit), plan_only=True)
        print("\n".join(fit.lines()))
        return 0
    cfg = resume_config(explicit.get("output_dir"), explicit) if args.resume else FinetuneConfig(**explicit)
    with distributed_from_env():  # data-parallel under torchrun / accelerate launch
        summary = TrainingRun(cfg, resume=args.resume, explicit=set(explicit)).run()
    return 0 if summary["steps"] > 0 else 1
