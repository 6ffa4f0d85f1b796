"""`ladder-kernels generate`: load a backbone and a side network (or LoRA adapter) saved by `finetune`,
and print a completion."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ladder_kernels.train.data import arith_prompt, sentiment_prompt
from ladder_kernels.train.run import ADAPTER, ADAPTER_INFO, DTYPES, ConfigError, RunDirError, greedy_complete
from ladder_kernels.train.backbones import ModelError, load_backbone, load_tokenizer, resolve_model


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder: `path` itself, or the adapter/ inside a finetune run folder."""
    path = Path(path)
    for candidate in (path, path / ADAPTER):
        if (candidate / ADAPTER_INFO).is_file():
            return candidate
    if not path.exists():
        raise RunDirError(f"--adapter: no such folder: {path}")
    raise RunDirError(f"--adapter: {path} holds no adapter saved by `ladder-kernels finetune` (no {ADAPTER_INFO})")


def load_finetuned(path: str | Path):
    """(model in eval mode, tokenizer, adapter info) from an adapter folder or a run folder."""
    folder = adapter_folder(path)
    info = json.loads((folder / ADAPTER_INFO).read_text(encoding="utf-8"))
    model_dir = resolve_model(info["model"])
    tokenizer = load_tokenizer(model_dir)
    dtype = DTYPES[info["dtype"]]
    if info["method"] == "qlora":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from ladder_kernels.planning.methods import make_qlora_model

        model = make_qlora_model(model_dir, compute_dtype=dtype)
        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    else:
        from ladder_kernels.nn.ladder import LadderModel

        try:
            model = LadderModel.from_pretrained(load_backbone(model_dir, dtype), folder)
        except (ValueError, OSError) as exc:
            raise ModelError(f"--adapter: cannot load the side network in {folder}: {exc}") from None
    return model.eval(), tokenizer, info


def default_max_new_tokens(info: dict, tokenizer) -> int:
    """A classifier was trained to emit a label, not to stop after it: its longest label; otherwise 32."""
    labels = info.get("labels") or []
    return max((len(tokenizer(" " + lab, add_special_tokens=False)["input_ids"]) for lab in labels), default=32)


def task_prompt(task: str, text: str) -> str:
    return sentiment_prompt(text) if task == "sentiment" else arith_prompt(text)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt with a fine-tuned adapter",
                              description="Load the backbone and the side network saved by `ladder-kernels finetune` and print a greedy completion.")
    p.add_argument("--adapter", required=True, help="a finetune run folder, or its adapter/ folder")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--task-template", action="store_true",
                   help="wrap --prompt in the adapter's task template (sentiment: the prompt is the tweet; arith: the question)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: the longest label for a classifier, else 32)")
    p.set_defaults(func=run_generate_command)


def run_generate_command(args: argparse.Namespace) -> int:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt.strip():
        raise ConfigError("--prompt must not be empty")
    model, tokenizer, info = load_finetuned(args.adapter)
    max_new_tokens = args.max_new_tokens or default_max_new_tokens(info, tokenizer)
    prompt = task_prompt(info["task"], args.prompt) if args.task_template else args.prompt
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    print(prompt + greedy_complete(model, tokenizer, prompt_ids, max_new_tokens))
    return 0
