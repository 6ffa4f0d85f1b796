"""`ladder-kernels generate`: load a backbone and a side network (or LoRA adapter) saved by `finetune`,
and print a completion."""

from __future__ import annotations

import argparse

from ladder_kernels.errors import ConfigError
from ladder_kernels.train.chat import check_chat_template, render_chat_prompt
from ladder_kernels.train.data import task_prompt
from ladder_kernels.train.evaluate import default_max_new_tokens, greedy_complete
from ladder_kernels.train.run_dir import load_finetuned


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="complete a prompt with a fine-tuned adapter",
        description="Load the backbone and the side network saved by `ladder-kernels finetune` and print a greedy "
        "completion.",
    )
    p.add_argument("--adapter", required=True, help="a finetune run folder, or its adapter/ folder")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--task-template",
        action="store_true",
        help="wrap --prompt in the adapter's task template (sentiment: the prompt is the tweet; arith: the question)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="render --prompt as a user turn with the model's chat template (as finetune renders chat-format data) "
        "and print the assistant's reply",
    )
    p.add_argument("--system", default=None, help="with --chat: a system turn before the prompt")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate (default: the longest label for a classifier, else 32)",
    )
    p.set_defaults(func=run_generate_command)


def run_generate_command(args: argparse.Namespace) -> int:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt.strip():
        raise ConfigError("--prompt must not be empty")
    if args.chat and args.task_template:
        raise ConfigError("--chat and --task-template are two ways to wrap --prompt: give one")
    if args.system is not None and not args.chat:
        raise ConfigError("--system applies with --chat only")
    model, tokenizer, info = load_finetuned(args.adapter)
    max_new_tokens = args.max_new_tokens or default_max_new_tokens(info, tokenizer)
    if args.chat:
        check_chat_template(tokenizer, info["model"], what="--chat renders the prompt with a chat template")
        prompt_ids = tokenizer(render_chat_prompt(tokenizer, args.prompt, args.system), add_special_tokens=False)
        print(greedy_complete(model, tokenizer, prompt_ids["input_ids"], max_new_tokens).strip())
        return 0
    prompt = task_prompt(info["task"], args.prompt) if args.task_template else args.prompt
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    print(prompt + greedy_complete(model, tokenizer, prompt_ids, max_new_tokens))
    return 0
