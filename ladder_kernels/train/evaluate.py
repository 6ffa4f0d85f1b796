"""Held-out evaluation: classification by the label words' first-token scores, generation by exact match (of the
final answer; for chat rows, of the whole last assistant turn, whitespace-normalized)."""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import torch

from ladder_kernels.train import distributed
from ladder_kernels.train.data import Dataset, Example, collate, final_answer, label_first_tokens, prompt_ids


def _model_input(batch: dict, dev: torch.device) -> dict:
    return {k: v.to(dev) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def evaluate(
    model, tokenizer, dataset: Dataset, examples: Sequence[Example], seq_len: int, batch_size: int, desc: str
) -> dict:
    """Held-out accuracy: classification by the label words' first-token scores, generation by exact match."""
    was_training = model.training
    model.eval()
    try:
        if dataset.is_classification:
            return _evaluate_classification(model, tokenizer, dataset, examples, seq_len, batch_size, desc)
        return _evaluate_generation(model, tokenizer, examples, seq_len, desc, dataset.chat)
    finally:
        model.train(was_training)


def _evaluate_classification(model, tokenizer, dataset, examples, seq_len, batch_size, desc) -> dict:
    from tqdm.auto import tqdm

    label_ids = torch.tensor(label_first_tokens(tokenizer, dataset.labels, chat=dataset.chat))
    prompts = prompt_ids(tokenizer, examples, seq_len)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    predicted: list[Optional[str]] = [None] * len(prompts)
    dev = distributed.device()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        chunk = order[start : start + batch_size]
        batch = collate([(prompts[i], prompts[i]) for i in chunk], tokenizer.pad_token_id)
        logits = model(**_model_input(batch, dev)).logits
        last = batch["attention_mask"].sum(1) - 1
        scores = logits[torch.arange(len(chunk)), last.to(logits.device)][:, label_ids.to(logits.device)]
        for i, k in zip(chunk, scores.argmax(-1).tolist()):
            predicted[i] = dataset.labels[k]
    correct = sum(p == dataset.label_of(ex) for p, ex in zip(predicted, examples))
    return {
        "accuracy": correct / len(examples),
        "n": len(examples),
        "predicted": dict(sorted(Counter(predicted).items())),
    }


def greedy_complete(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of one prompt, decoded (special tokens dropped)."""
    dev = distributed.device()
    input_ids = torch.tensor([prompt_ids], device=dev)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, len(prompt_ids) :].tolist(), skip_special_tokens=True)


def exact_reply(text: str) -> str:
    """A chat reply as exact match compares it: whitespace runs as one space, stripped."""
    return " ".join(text.split())


def _evaluate_generation(model, tokenizer, examples, seq_len, desc, chat: bool = False) -> dict:
    from tqdm.auto import tqdm

    score = exact_reply if chat else final_answer
    correct, samples = 0, []
    for ex, ids in tqdm(
        list(zip(examples, prompt_ids(tokenizer, examples, seq_len))),
        desc=desc,
        unit="example",
        leave=False,
    ):
        reference = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        text = greedy_complete(model, tokenizer, ids, max_new_tokens=min(seq_len, 2 * len(reference) + 8))
        correct += score(text) == score(ex.completion)
        if len(samples) < 3:
            samples.append({"prompt": ex.prompt, "output": text.strip(), "reference": ex.completion.strip()})
    return {"accuracy": correct / len(examples), "n": len(examples), "samples": samples}


def default_max_new_tokens(info: dict, tokenizer) -> int:
    """A classifier was trained to emit a label, not to stop after it: its longest label; otherwise 32."""
    labels = info.get("labels") or []
    return max((len(tokenizer(" " + lab, add_special_tokens=False)["input_ids"]) for lab in labels), default=32)
