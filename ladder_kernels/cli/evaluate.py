"""`ladder-kernels evaluate`: held-out accuracy of an adapter saved by `finetune`, on as many held-out examples
as asked (finetune evaluates 300 tweets by default: +-2.7 points of sampling noise; 1000 give +-1.5)."""

from __future__ import annotations

import argparse
import json

from ladder_kernels.defaults import DEFAULT_EVAL_SAMPLES
from ladder_kernels.errors import ConfigError
from ladder_kernels.io import write_text_atomic
from ladder_kernels.train.config import FinetuneConfig
from ladder_kernels.train.data import EMBEDDED_DATA, load_dataset
from ladder_kernels.train.evaluate import evaluate
from ladder_kernels.train.run_dir import load_finetuned


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="held-out accuracy of a fine-tuned adapter",
        description="Load the backbone and the adapter saved by `ladder-kernels finetune` and evaluate it "
        "on the task's held-out split, as finetune does (classification: label scores; "
        "arith: exact match of the greedy answer).",
    )
    p.add_argument("--adapter", required=True, help="a finetune run folder, or its adapter/ folder")
    p.add_argument(
        "--data",
        default=EMBEDDED_DATA,
        help="the data file the adapter was trained on (default: the task's embedded data)",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help=f"held-out examples (default: {', '.join(f'{k} {v}' for k, v in DEFAULT_EVAL_SAMPLES.items())})",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=FinetuneConfig.seq_len,
        help="maximum tokens per prompt, as in training (default: %(default)s)",
    )
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=run_evaluate_command)


def run_evaluate_command(args: argparse.Namespace) -> int:
    for name, minimum in (("eval_samples", 1), ("seq_len", 8)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value}")
    model, tokenizer, info = load_finetuned(args.adapter)
    dataset = load_dataset(info["task"], args.data)
    if dataset.labels is not None and list(dataset.labels) != list(info.get("labels") or []):
        raise ConfigError(
            f"--data: its labels {list(dataset.labels)} are not the adapter's {info.get('labels')}; pass the file it "
            "was trained on"
        )
    examples = dataset.heldout[: args.eval_samples or DEFAULT_EVAL_SAMPLES[info["task"]]]
    result = evaluate(model, tokenizer, dataset, examples, args.seq_len, 32, "evaluate")
    result = {
        "adapter": str(args.adapter),
        "method": info["method"],
        "task": info["task"],
        "data": dataset.source,
        **result,
    }
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    predicted = f", predicted {result['predicted']}" if "predicted" in result else ""
    print(
        f"{info['method']} {info['task']}: held-out accuracy {result['accuracy']:.1%} on {result['n']} examples "
        f"({dataset.source}){predicted}"
    )
    return 0
