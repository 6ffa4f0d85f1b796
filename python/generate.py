"""Generate with a side network saved by `ladder-kernels finetune` (or `python/hf_trainer.py`'s run folder
holding a finetune-style adapter): the backbone is rebuilt from the model the adapter names.

    ladder-kernels finetune --steps 100 --output-dir runs/sentiment
    python python/generate.py --adapter runs/sentiment --tweet "the new self-driving bus is brilliant"
    python python/generate.py --adapter runs/sentiment \\
        --prompt "Tweet: ...\\nSentiment (negative, neutral or positive):"
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    from ladder_kernels.cli.generate import default_max_new_tokens, load_finetuned, task_prompt
    from ladder_kernels.train.data import label_first_tokens
    from ladder_kernels.train.evaluate import greedy_complete

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="a finetune run folder or its adapter/ folder")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="a raw prompt")
    text.add_argument("--tweet", help="text wrapped in the adapter's task template")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: the longest label for a classifier, else 32"
    )
    args = p.parse_args(argv)

    model, tokenizer, info = load_finetuned(args.adapter)
    prompt = args.prompt if args.prompt is not None else task_prompt(info["task"], args.tweet)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    print(
        prompt
        + greedy_complete(model, tokenizer, prompt_ids, args.max_new_tokens or default_max_new_tokens(info, tokenizer))
    )
    if info.get("labels"):  # a classifier: also show the label words' probabilities
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids], device=model.device)).logits[0, -1].float()
        probs = logits[label_first_tokens(tokenizer, info["labels"])].softmax(-1)
        print("label probabilities: " + ", ".join(f"{lab} {p:.2f}" for lab, p in zip(info["labels"], probs.tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
