"""Chat-format data (`messages` rows): rendering with the tokenizer's template, the loss mask on assistant turns,
truncation, malformed rows with their line numbers, and a tiny end-to-end fine-tune scored by exact match."""

from __future__ import annotations

import json
import random

import pytest

from ladder_kernels.errors import DataError, ModelError
from ladder_kernels.train.backbones import load_tokenizer
from ladder_kernels.train.chat import encode_chat, parse_messages, render_chat_prompt
from ladder_kernels.train.config import FinetuneConfig
from ladder_kernels.train.data import load_dataset, read_user_file
from ladder_kernels.train.run import TrainingRun
from tests.helpers import write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

CONVERSATION = (
    ("system", "be brief"),
    ("user", "what is 2 + 3?"),
    ("assistant", "5"),
    ("user", "and 4 + 4?"),
    ("assistant", "The answer is 8."),
)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _chat_row(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def _expected_mask(tokenizer, messages):
    """Independently of train/chat.py: the rendered text, and per token whether it lies in an assistant reply or
    the '</s>' that ends it (found by searching the text for '<s>assistant\\n' + reply + '</s>' in order)."""
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False)
    spans, pos = [], 0
    for role, content in messages:
        if role == "assistant":
            start = text.index("<s>assistant\n" + content + "</s>", pos) + len("<s>assistant\n")
            spans.append((start, start + len(content) + len("</s>")))
            pos = spans[-1][1]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    return text, enc["input_ids"], inside


def test_loss_mask_covers_exactly_the_assistant_turns_token_by_token(tokenizer):
    text, expected_ids, inside = _expected_mask(tokenizer, CONVERSATION)
    ids, labels, truncated = encode_chat(tokenizer, CONVERSATION, seq_len=512)
    assert not truncated and ids == expected_ids
    assert labels == [t if keep else -100 for t, keep in zip(ids, inside)]
    assert tokenizer.decode([t for t in labels if t != -100]) == "5</s>The answer is 8.</s>"
    assert sum(inside) < len(ids) / 2  # the system and user turns and the headers are masked


def test_left_truncation_keeps_the_last_assistant_turn_whole(tokenizer):
    long_context = (("user", "tell me about cars " * 20), ("assistant", "no"), ("user", "what is 1 + 1?"))
    messages = long_context + (("assistant", "The answer is 2."),)
    full_ids, full_labels, _ = encode_chat(tokenizer, messages, seq_len=4096)
    ids, labels, truncated = encode_chat(tokenizer, messages, seq_len=40)
    assert truncated and len(ids) == 40
    assert ids == full_ids[-40:] and labels == full_labels[-40:]  # cut from the left only
    reply = tokenizer("The answer is 2.</s>", add_special_tokens=False)["input_ids"]
    assert labels[-len(reply) - 1 :] == reply + [-100]  # the newline after the end of turn is not learned
    with pytest.raises(DataError, match=r"data.jsonl:7: the last assistant turn needs \d+ tokens .* --seq-len 12"):
        encode_chat(tokenizer, messages, seq_len=12, where="data.jsonl:7")


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, r"messages\[0\].role must be one"),
        (_chat_row(("robot", "hi"), ("assistant", "x")), r"messages\[0\].role must be one of system, user, assistant"),
        ({"messages": [{"role": "user", "content": ["a", "b"]}]}, r"messages\[0\].content must be a string, got list"),
        (_chat_row(("system", "s"), ("user", "hi")), "no assistant turn"),
        (_chat_row(("user", "hi"), ("assistant", "x"), ("user", "more?")), "last message must be an assistant turn"),
        ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
        (_chat_row(("user", "hi"), ("assistant", "  ")), "empty assistant turn"),
        ({"prompt": "a", "completion": "b"}, "mixes chat rows"),
    ],
)
def test_malformed_chat_rows_name_their_line(tmp_path, row, needle):
    path = _jsonl(tmp_path / "chat.jsonl", [_chat_row(("user", "hi"), ("assistant", "hello")), "", row])
    with pytest.raises(DataError, match=rf"chat.jsonl:3: .*{needle}"):
        read_user_file(path, "sentiment")


def test_chat_rows_in_a_csv_are_refused(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"[]"\n', encoding="utf-8")
    with pytest.raises(DataError, match="must be in a .jsonl file"):
        read_user_file(path, "sentiment")


def test_a_bad_row_is_one_line_and_exit_2_on_the_command_line(tmp_path, tiny_model, capsys):
    from ladder_kernels.cli import main

    path = _jsonl(tmp_path / "chat.jsonl", [_chat_row(("user", "hi"), ("assistant", "a")), _chat_row(("user", "x"))])
    assert main(["finetune", "--model", str(tiny_model), "--data", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{path}:2: messages has no assistant turn" in err, err


def _arith_chat_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        turns = [("user", f"what is {a} + {b}?"), ("assistant", f"The answer is {a + b}.")]
        if i % 2:  # multi-turn rows: the earlier assistant turn is learned too
            turns = [("system", "answer briefly"), ("user", "hi"), ("assistant", "hello")] + turns
        rows.append(_chat_row(*turns))
    return rows


def test_classification_or_exact_match_follows_the_replies(tmp_path):
    ds = load_dataset("sentiment", str(_jsonl(tmp_path / "a.jsonl", _arith_chat_rows(60))))
    assert ds.chat and ds.labels is None  # many distinct replies: exact match
    rows = [_chat_row(("user", f"car {i} is ok"), ("assistant", "so")) for i in range(40)]
    rows += [_chat_row(("user", f"bus {i} is great"), ("assistant", "good")) for i in range(40)]
    ds = load_dataset("arith", str(_jsonl(tmp_path / "c.jsonl", rows)))
    assert ds.chat and ds.labels == ("good", "so")  # two values over 80 rows: classification
    assert ds.train[0].messages is not None and ds.label_of(ds.train[0]) in ds.labels


def test_chat_finetune_end_to_end_reports_exact_match(tiny_model, tmp_path, monkeypatch, capsys):
    data = _jsonl(tmp_path / "chat.jsonl", _arith_chat_rows(80))
    cfg = FinetuneConfig(
        model=str(tiny_model),
        data=str(data),
        seq_len=64,
        batch_size=4,
        steps=3,
        lr=1e-2,
        lr_rule="uniform",
        epochs=1,
        warmup_steps=1,
        reduction_factor=2,
        eval_samples=4,
        dtype="float32",
        output_dir=str(tmp_path / "run"),
    )
    summary = TrainingRun(cfg).run()
    assert summary["data_format"] == "chat" and summary["metric"] == "exact match"
    assert summary["steps"] == 3 and all(x == x for x in [summary["final_loss"]])  # finite loss (not NaN)
    after = summary["eval_after"]
    assert after["n"] == 4 and 0 <= after["accuracy"] <= 1 and after["samples"]
    assert after["samples"][0]["reference"].startswith("The answer is ")
    assert "held-out exact match after" in (tmp_path / "run" / "summary.md").read_text()
    info = json.loads((tmp_path / "run" / "adapter" / "finetune.json").read_text())
    assert info["chat"] is True

    # generate --chat: the prompt goes through the same template, as a user turn
    from ladder_kernels.cli import generate as generate_cli
    from ladder_kernels.cli import main

    seen = []
    real = generate_cli.greedy_complete
    monkeypatch.setattr(generate_cli, "greedy_complete", lambda m, t, ids, n: seen.append(ids) or real(m, t, ids, n))
    assert main(["generate", "--adapter", str(tmp_path / "run"), "--chat", "--prompt", "what is 1 + 2?"]) == 0
    tokenizer = load_tokenizer(tiny_model)
    assert seen == [tokenizer("<s>user\nwhat is 1 + 2?</s>\n<s>assistant\n", add_special_tokens=False)["input_ids"]]
    assert capsys.readouterr().out.endswith("\n")  # the reply alone, on its line


def test_a_model_without_a_chat_template_is_named(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "plain", chat_template=False)
    data = _jsonl(tmp_path / "chat.jsonl", _arith_chat_rows(10))
    cfg = FinetuneConfig(model=str(model), data=str(data), output_dir=str(tmp_path / "o"))
    with pytest.raises(ModelError, match=f"tokenizer of --model {model} has no chat template"):
        TrainingRun(cfg)
    assert not (tmp_path / "o").exists()


def test_a_too_long_row_is_refused_with_its_line_before_training(tiny_model, tmp_path):
    rows = _arith_chat_rows(10) + [_chat_row(("user", "hi"), ("assistant", "word " * 200))]
    data = _jsonl(tmp_path / "chat.jsonl", rows)
    cfg = FinetuneConfig(model=str(tiny_model), data=str(data), seq_len=64, output_dir=str(tmp_path / "o"))
    # (the split is fixed: the long row is a training row; held-out prompts are truncated instead)
    assert any("word word" in ex.completion for ex in load_dataset("sentiment", str(data)).train)
    with pytest.raises(DataError, match=r"chat.jsonl:11: the last assistant turn needs"):
        TrainingRun(cfg)
    assert not (tmp_path / "o").exists()


def test_parse_messages_freezes_the_turns():
    assert parse_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "x:1") == (
        ("user", "a"),
        ("assistant", "b"),
    )


def test_render_chat_prompt_ends_with_the_generation_prompt(tokenizer):
    assert render_chat_prompt(tokenizer, "hi") == "<s>user\nhi</s>\n<s>assistant\n"
    assert render_chat_prompt(tokenizer, "hi", system="s").startswith("<s>system\ns</s>\n")
