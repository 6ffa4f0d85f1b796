"""Train a Ladder side network with TRL's `SFTTrainer` (TRL is an optional extra: `pip install trl`).

The data are prompt/completion pairs with the loss on the completion only. TRL's extra metrics read
`outputs.logits`, which Ladder's fused cross-entropy never materializes, so the loss goes through the
plain `Trainer.compute_loss`.

    pip install trl
    python python/trl_sft.py --steps 60 --output-dir runs/trl-sft
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

TRL_MISSING = "python/trl_sft.py needs TRL, an optional extra: pip install trl"


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
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--output-dir", default="runs/trl-sft")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        print(TRL_MISSING, file=sys.stderr)
        return 2
    from datasets import Dataset
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    from ladder_kernels.nn.config import LadderConfig
    from ladder_kernels.nn.ladder import LadderModel
    from ladder_kernels.train.backbones import load_backbone, load_tokenizer, resolve_model
    from ladder_kernels.train.data import collate, encode_example, load_dataset

    class LadderSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(
                self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    dataset = load_dataset(args.task, args.data)
    model = LadderModel(
        load_backbone(model_dir, getattr(torch, args.dtype)), LadderConfig(reduction_factor=args.reduction_factor)
    )

    # Pre-tokenized rows: TRL skips its own tokenization when the dataset already has input_ids.
    n_rows = min(len(dataset.train), args.steps * args.batch_size)
    rows = [
        encode_example(tokenizer, ex, args.seq_len, add_eos=not dataset.is_classification)
        for ex in dataset.train[:n_rows]
    ]
    train = Dataset.from_list([{"input_ids": ids, "labels": labels} for ids, labels, _ in rows])
    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        max_length=args.seq_len,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        logging_steps=max(1, args.steps // 20),
        save_steps=max(1, args.steps // 2),
        save_total_limit=1,
    )
    trainer = LadderSFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=lambda batch: collate([(r["input_ids"], r["labels"]) for r in batch], tokenizer.pad_token_id),
    )
    trainer.train()
    adapter = Path(args.output_dir) / "adapter"
    model.save_pretrained(adapter)
    print(f"trained {trainer.state.global_step} steps with TRL; side network saved to {adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
