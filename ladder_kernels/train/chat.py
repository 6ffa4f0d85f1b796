"""Chat-format data: JSONL rows with a `messages` list, as TRL, axolotl and most instruction datasets write them.

A row is `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}` ending with an assistant
turn. It is rendered with the tokenizer's own chat template; the loss covers the assistant turns only (each reply
and the template's end-of-turn text after it, so the model learns to stop), in every turn of a multi-turn row. A
row longer than --seq-len loses tokens from its start; the last assistant turn is always kept whole, and a row whose
last turn (with its generation prompt) does not fit is an error naming its line.

Held-out rows are scored on their last assistant turn: the conversation before it is the prompt.
"""

from __future__ import annotations

from typing import Sequence

from ladder_kernels.defaults import CHAT_ROLES
from ladder_kernels.errors import DataError, ModelError

Messages = tuple[tuple[str, str], ...]  # ((role, content), ...)


def parse_messages(value, where: str) -> Messages:
    """A row's `messages` checked and frozen; `where` is 'file:line' for the one-line error."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of turns, got {value!r:.80}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content', got {turn!r:.80}")
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r:.80}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: messages[{i}] is an empty assistant turn")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: messages has no assistant turn (nothing to learn)")
    if turns[-1][0] != "assistant":
        raise DataError(f"{where}: the last message must be an assistant turn (the reply that is learned and scored)")
    return tuple(turns)


def as_dicts(messages: Messages) -> list[dict]:
    return [{"role": role, "content": content} for role, content in messages]


def check_chat_template(tokenizer, model: str, what: str = "--data is in chat format ('messages' rows)") -> None:
    """A ModelError naming the model when its tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{what}, but the tokenizer of --model {model} has no chat template; use a model with one (an instruct "
            "or chat checkpoint) or prompt/completion rows"
        )


def _render(tokenizer, messages: Messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(as_dicts(messages), tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [start, end) character spans of each assistant turn in it).

    A turn's span is what rendering it adds after the generation prompt: its reply and the template's end-of-turn
    text (without the whitespace that follows it). Needs a template that renders each conversation as a prefix of
    its continuation (ChatML, Llama, Mistral, Gemma and SmolLM templates do); one that does not is an error."""
    text = _render(tokenizer, messages)
    spans = []
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before, through = (
            _render(tokenizer, messages[:i], generation_prompt=True),
            _render(tokenizer, messages[: i + 1]),
        )
        if not (through.startswith(before) and text.startswith(through)):
            raise ModelError(
                "the tokenizer's chat template does not render a conversation as a prefix of its continuation, so its "
                "assistant turns cannot be located for the loss mask"
            )
        spans.append((len(before), len(through.rstrip())))  # the whitespace after the end of turn is not learned
    return text, spans


def encode_chat(tokenizer, messages: Messages, seq_len: int, where: str = "row") -> tuple[list[int], list[int], bool]:
    """(input_ids, labels: the assistant tokens, -100 elsewhere; truncated?). Truncation drops tokens from the start;
    a conversation whose last assistant turn and its prompt header do not fit in `seq_len` is a DataError."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels, first_of_last = [], None
    for k, (tok, (start, end)) in enumerate(zip(ids, offsets)):
        inside = [j for j, (a, b) in enumerate(spans) if start >= a and end <= b and end > start]
        labels.append(tok if inside else -100)
        if inside and inside[0] == len(spans) - 1 and first_of_last is None:
            first_of_last = k
    if first_of_last is None:  # a template that drops the reply
        raise ModelError("the tokenizer's chat template rendered no tokens for the last assistant turn")
    # where the last turn begins: its generation-prompt header, then the reply
    context = messages[:-1]
    turn_start = len(tokenizer(_render(tokenizer, context), add_special_tokens=False)["input_ids"]) if context else 0
    turn_start = min(turn_start, first_of_last)
    keep_from = len(ids) - seq_len
    if keep_from <= 0:
        return ids, labels, False
    if keep_from > turn_start:
        raise DataError(
            f"{where}: the last assistant turn needs {len(ids) - turn_start} tokens with its header, more than "
            f"--seq-len {seq_len}; raise --seq-len or shorten the row"
        )
    return ids[keep_from:], labels[keep_from:], True


def chat_prompt_ids(tokenizer, messages: Messages, seq_len: int) -> list[int]:
    """The prompt for scoring a conversation's last assistant turn: every turn before it and the generation prompt,
    keeping its last seq_len - 1 tokens."""
    ids = tokenizer(_render(tokenizer, messages[:-1], generation_prompt=True), add_special_tokens=False)["input_ids"]
    return ids[-(seq_len - 1) :]


def chat_label_first_tokens(tokenizer, labels: Sequence[str]) -> list[int]:
    """First token of each label as the template's reply starts it (right after the generation prompt)."""
    return [tokenizer(lab, add_special_tokens=False)["input_ids"][0] for lab in labels]


def render_chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """`ladder-kernels generate --chat`: the prompt as a user turn (after an optional system turn), rendered with
    the generation prompt."""
    turns = ((("system", system),) if system else ()) + (("user", prompt),)
    return _render(tokenizer, turns, generation_prompt=True)
