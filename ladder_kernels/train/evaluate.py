"""Held-out evaluation: classification by the label words' first-token scores, generation by exact match (of the
final answer; for chat rows, of the whole last assistant turn, whitespace-normalized)."""

from __future__ import annotations

import re
import time
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
        return _evaluate_generation(model, tokenizer, examples, seq_len, batch_size, desc, dataset.chat)
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
        last = batch["attention_mask"].sum(1) - 1
        # logits for the last positions only, as few as hold every row's last token (the rows' lengths are close):
        # lm_head over every position would cost more than the backbone on a large vocabulary
        keep = int(batch["input_ids"].shape[1] - last.min())
        logits = model(**_model_input(batch, dev), logits_to_keep=keep).logits
        where = (last - (batch["input_ids"].shape[1] - keep)).to(logits.device)
        scores = logits[torch.arange(len(chunk)), where][:, label_ids.to(logits.device)]
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


ANSWER_END = re.compile(r"The answer is\s*-?\d+(?:\.\d+)?\.")


def answer_end(text: str) -> int | None:
    """Where a step-by-step answer ends: just after the first 'The answer is N.', None if it has none."""
    match = ANSWER_END.search(text)
    return match.end() if match else None


def _cut(tokenizer, tokens: list[int], eos: set, stop_at_answer: bool) -> tuple[str, int]:
    """(text, tokens generated) of a row stopped at its first EOS or, for step-by-step answers, at the answer's
    end: what a generation that stopped there would have produced (greedy decoding is prefix-deterministic)."""
    n = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
    tokens = tokens[:n]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    end = answer_end(text) if stop_at_answer else None
    if end is not None:
        # the fewest tokens whose text holds the whole answer
        n = next(
            k for k in range(1, len(tokens) + 1) if answer_end(tokenizer.decode(tokens[:k], skip_special_tokens=True))
        )
        text = text[:end]
    return text, n


def greedy_answers(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: Sequence[int],
    batch_size: int,
    desc: str = "",
    stop_at_answer: bool = True,
) -> list[tuple[str, int]]:
    """Greedy continuations of token-id prompts, `batch_size` at a time (left-padded, similar lengths together):
    per prompt (text, generated tokens), row i cut at max_new_tokens[i], at its first EOS and (stop_at_answer) at
    'The answer is N.'. Batched rows give the same tokens as one at a time (tests/train/test_evaluate.py)."""
    from tqdm.auto import tqdm

    from ladder_kernels.nn.ladder import LadderModel

    dev, pad = distributed.device(), tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[tuple[str, int]] = [("", 0)] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False, disable=not desc):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):  # left padding: every row's next token is at the same column
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        extra = {} if isinstance(model, LadderModel) else {"pad_token_id": pad}  # HF generate fills finished rows
        generated = model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max(max_new_tokens[i] for i in chunk),
            do_sample=False,
            eos_token_id=eos,
            **extra,
        )[:, width:].tolist()
        for row, i in enumerate(chunk):
            out[i] = _cut(tokenizer, generated[row][: max_new_tokens[i]], {eos}, stop_at_answer)
    return out


def _evaluate_generation(model, tokenizer, examples, seq_len, batch_size, desc, chat: bool = False) -> dict:
    score = exact_reply if chat else final_answer
    started = time.perf_counter()
    limits = [
        min(seq_len, 2 * len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + 8) for ex in examples
    ]
    prompts = prompt_ids(tokenizer, examples, seq_len)
    # a chat reply is scored whole: no cut at 'The answer is'
    answers = greedy_answers(model, tokenizer, prompts, limits, batch_size, desc, stop_at_answer=not chat)
    correct = sum(score(text) == score(ex.completion) for (text, _), ex in zip(answers, examples))
    samples = [
        {"prompt": ex.prompt, "output": text.strip(), "reference": ex.completion.strip()}
        for (text, _), ex in list(zip(answers, examples))[:3]
    ]
    return {
        "accuracy": correct / len(examples),
        "n": len(examples),
        "mean_generated_tokens": sum(n for _, n in answers) / len(examples),
        "eval_seconds": time.perf_counter() - started,  # wall time, generation included
        "samples": samples,
    }


def default_max_new_tokens(info: dict, tokenizer) -> int:
    """A classifier was trained to emit a label, not to stop after it: its longest label; otherwise 32."""
    labels = info.get("labels") or []
    return max((len(tokenizer(" " + lab, add_special_tokens=False)["input_ids"]) for lab in labels), default=32)
