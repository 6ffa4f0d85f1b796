"""Datasets: embedded tasks, user files (and their errors with line numbers), batches, tokenization."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from ladder_kernels.errors import DataError
from ladder_kernels.train.data import (
    SENTIMENT_LABELS,
    BatchStream,
    Dataset,
    Example,
    collate,
    encode_example,
    final_answer,
    generate_arith,
    label_first_tokens,
    load_dataset,
    read_user_file,
)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_embedded_sentiment_split_is_deterministic_disjoint_and_three_class():
    a, b = load_dataset("sentiment"), load_dataset("sentiment")
    assert a.heldout == b.heldout and a.train[:50] == b.train[:50]
    assert len(a.heldout) == 2000 and len(a.train) > 30000
    assert not {ex.prompt for ex in a.heldout} & {ex.prompt for ex in a.train}
    assert a.labels == SENTIMENT_LABELS
    counts = Counter(a.label_of(ex) for ex in a.heldout)
    assert set(counts) == set(SENTIMENT_LABELS) and min(counts.values()) > 100
    ex = a.train[0]
    assert ex.prompt.startswith("Tweet: ") and ex.prompt.endswith("\nSentiment (negative, neutral or positive):")
    assert ex.completion in {" negative", " neutral", " positive"}


def _replayed_steps(ex):
    """The completion's "a op b = c." steps as (a, op, b, c), each checked true and chained to the previous one."""
    steps, value = [], None
    for s in (s.strip() for s in ex.completion.split(".") if "=" in s):
        lhs, rhs = s.split("=")
        a, op, b = lhs.split()
        assert eval(lhs) == int(rhs)  # noqa: S307 - generated arithmetic only
        assert value is None or int(a) == value
        value = int(rhs)
        steps.append((int(a), op, int(b), value))
    assert final_answer(ex.completion) == str(value)
    return steps


@pytest.mark.parametrize("level", ["standard", "easy"])
def test_arith_generator_answers_are_right_and_heldout_unseen(level):
    train, heldout = generate_arith(n_train=300, n_heldout=50, level=level)
    assert not {ex.prompt for ex in heldout} & {ex.prompt for ex in train}
    counts = {len(_replayed_steps(ex)) for ex in train[:200]}
    assert counts == ({2} if level == "easy" else {2, 3})


def test_arith_easy_level_keeps_its_numbers_small():
    train, _ = generate_arith(n_train=500, n_heldout=10, level="easy")
    for ex in train:
        steps = _replayed_steps(ex)
        assert 2 <= steps[0][0] <= 20
        for _, op, b, value in steps:
            assert (2 <= b <= 3) if op == "*" else (1 <= b <= 9)
            assert 0 < value < 60
    assert {op for ex in train for _, op, _, _ in _replayed_steps(ex)} == {"+", "-", "*"}


def test_final_answer_extraction():
    assert final_answer(" 3 + 4 = 7. The answer is 7.") == "7"
    assert final_answer("so we get 12 then 15") == "15"
    assert final_answer("no digits") == "no digits"


def test_user_jsonl_prompt_completion_and_text_label(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl", [{"prompt": "Q: 1+1?", "completion": "2"}, {"prompt": "Q: 2+2?", "completion": "4"}]
    )
    assert read_user_file(path, "arith") == [Example("Q: 1+1?", " 2"), Example("Q: 2+2?", " 4")]
    path = _jsonl(
        tmp_path / "t.jsonl", [{"text": "great car", "label": "positive"}, {"text": "bad car", "label": "negative"}]
    )
    ex = read_user_file(path, "sentiment")[0]
    assert ex.prompt.startswith("Tweet: great car\nSentiment") and ex.completion == " positive"


def test_user_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"good, really",positive\nawful,negative\nmeh,neutral\n', encoding="utf-8")
    ds = load_dataset("sentiment", str(path))
    assert ds.labels == ("negative", "neutral", "positive")
    assert len(ds.train) + len(ds.heldout) == 3 and len(ds.heldout) == 1


@pytest.mark.parametrize(
    "content, suffix, line, needle",
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n', ".jsonl", 2, "not valid JSON"),
        ('{"prompt": "a", "completion": "b"}\n\n{"question": "c"}\n', ".jsonl", 3, "expected fields"),
        ('{"prompt": "a", "completion": ""}\n', ".jsonl", 1, "field 'completion' must be a non-empty string"),
        ("[1, 2]\n", ".jsonl", 1, "expected a JSON object"),
        ("text,label\nfine,positive\ntoo,many,cells\n", ".csv", 3, "expected 2 columns"),
        ("text,label\nfine,positive\nmissing label,\n", ".csv", 3, "field 'label'"),
    ],
)
def test_malformed_rows_name_their_line(tmp_path, content, suffix, line, needle):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_user_file(path, "sentiment")
    assert f"{path}:{line}:" in str(err.value) and needle in str(err.value)


def test_invalid_utf8_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_user_file(path, "arith")


@pytest.mark.parametrize(
    "content, suffix, needle",
    [
        ("", ".jsonl", "empty dataset"),
        ("\n\n", ".jsonl", "empty dataset"),
        ("", ".csv", "empty dataset"),
        ("text,label\n", ".csv", "empty dataset"),
        ("a\tb\n", ".tsv", "expected a .jsonl or .csv"),
    ],
)
def test_empty_or_unsupported_files(tmp_path, content, suffix, needle):
    path = tmp_path / f"d{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=needle):
        load_dataset("sentiment", str(path))


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset("sentiment", str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="--task must be one of"):
        load_dataset("poetry")


def test_classification_needs_two_labels(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": "positive"} for i in range(5)])
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        load_dataset("sentiment", str(path))


def _toy_dataset(counts: dict[str, int]) -> Dataset:
    train = tuple(Example(f"p{lab}{i}", " " + lab) for lab, n in counts.items() for i in range(n))
    return Dataset("sentiment", train, (), tuple(sorted(counts)), "toy")


def _drawn_labels(ds, stream, steps):
    return Counter(ds.label_of(ds.train[i]) for step in range(steps) for i in stream.indices(step))


def test_fully_balanced_stream_draws_classes_equally_and_covers_each_class():
    ds = _toy_dataset({"negative": 50, "neutral": 30, "positive": 7})
    stream = BatchStream(ds, batch_size=6, seed=3, balance=1.0)
    drawn = [i for step in range(14) for i in stream.indices(step)]  # 84 draws = 28 per class = 4 passes of 'positive'
    assert Counter(ds.label_of(ds.train[i]) for i in drawn) == {"negative": 28, "neutral": 28, "positive": 28}
    positives = [i for i in drawn if ds.label_of(ds.train[i]) == "positive"]
    for p in range(4):  # each pass over the minority class is a permutation of it
        assert sorted(positives[7 * p : 7 * p + 7]) == list(range(80, 87))


@pytest.mark.parametrize("balance", [0.0, 0.5])
def test_partial_balance_draws_classes_in_proportion_to_a_power_of_their_size(balance):
    sizes = {"negative": 400, "neutral": 300, "positive": 100}
    ds = _toy_dataset(sizes)
    stream = BatchStream(ds, batch_size=16, seed=0, balance=balance)
    counts = _drawn_labels(ds, stream, 64)  # 1024 draws = 4 periods of the class pattern
    weights = {k: v ** (1 - balance) for k, v in sizes.items()}
    for label, w in weights.items():
        assert abs(counts[label] / 1024 - w / sum(weights.values())) < 0.01, (label, counts)
    if balance == 0.0:  # natural frequencies: one pass over the data is a permutation of it
        first_pass = [i for s in range(50) for i in stream.indices(s)]
        assert sorted(first_pass) == list(range(800))


def test_stream_is_a_function_of_seed_and_step():
    ds = _toy_dataset({"negative": 40, "neutral": 40, "positive": 10})
    for balance in (0.0, 0.5, 1.0):
        a, b = BatchStream(ds, 8, seed=1, balance=balance), BatchStream(ds, 8, seed=1, balance=balance)
        assert [a.indices(s) for s in range(20)] == [b.indices(s) for s in range(20)]
        assert a.indices(7) == BatchStream(ds, 8, seed=1, balance=balance).indices(7)  # no hidden state
        assert a.indices(0) != BatchStream(ds, 8, seed=2, balance=balance).indices(0)


def test_stream_rejects_bad_arguments():
    ds = _toy_dataset({"negative": 4, "positive": 4})
    with pytest.raises(ValueError, match="balance must be in"):
        BatchStream(ds, 8, seed=0, balance=1.5)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BatchStream(ds, 0, seed=0)


class _CharTokenizer:
    """One token per character (ord), BOS 1 added, EOS 2."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_encode_example_masks_prompt_and_truncates_prompt_start():
    tok = _CharTokenizer()
    ids, labels, truncated = encode_example(tok, Example("abc", " x"), seq_len=16, add_eos=True)
    assert ids == [1, 97, 98, 99, 32, 120, 2] and labels == [-100] * 4 + [32, 120, 2] and not truncated
    ids, labels, truncated = encode_example(tok, Example("abcdefgh", " x"), seq_len=6, add_eos=False)
    assert truncated and ids == [101, 102, 103, 104, 32, 120]  # BOS, a..d dropped; the completion is whole
    assert labels == [-100] * 4 + [32, 120]


def test_collate_right_pads():
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


class _WordTokenizer:
    """One token per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [sum(map(ord, w)) for w in text.split()]}


def test_label_first_tokens_must_differ():
    tok = _WordTokenizer()
    assert label_first_tokens(tok, ["no", "yes"]) == [ord("n") + ord("o"), ord("y") + ord("e") + ord("s")]
    with pytest.raises(DataError, match="start with the same token"):
        label_first_tokens(tok, ["very good", "very bad"])


@pytest.mark.parametrize("cot", ["full", "short", "none"])
def test_arith_cot_formats_share_questions_and_answers(cot):
    full_train, full_heldout = generate_arith(n_train=200, n_heldout=40)
    train, heldout = generate_arith(n_train=200, n_heldout=40, cot=cot)
    assert [ex.prompt for ex in heldout] == [ex.prompt for ex in full_heldout]
    assert [ex.prompt for ex in train] == [ex.prompt for ex in full_train]
    for ex, full in zip(train, full_train):
        assert final_answer(ex.completion) == final_answer(full.completion)
        steps = [s.strip() + "." for s in full.completion.split(".") if "=" in s]
        shown = {"full": steps, "short": steps[-1:], "none": []}[cot]
        assert ex.completion == " " + " ".join(shown + [f"The answer is {final_answer(full.completion)}."])
    assert load_dataset("arith", cot=cot).heldout[0].prompt == load_dataset("arith").heldout[0].prompt


def test_arith_cot_format_is_checked():
    import random

    from ladder_kernels.train.data import arith_problem

    with pytest.raises(DataError, match="--cot must be one of full, short, none"):
        arith_problem(random.Random(0), "brief")
    with pytest.raises(DataError, match="--arith-level must be one of standard, easy, got 'hard'"):
        arith_problem(random.Random(0), "full", "hard")


def test_arith_level_names_its_source_and_draws_other_problems():
    from ladder_kernels.defaults import ARITH_LEVELS
    from ladder_kernels.train.data import ARITH_RANGES

    assert tuple(ARITH_RANGES) == ARITH_LEVELS  # every level the CLI offers has its numbers
    easy = load_dataset("arith", cot="none", level="easy")
    assert easy.source == "embedded:arith-generator (--cot none, --arith-level easy)"
    assert easy.heldout[0].prompt != load_dataset("arith", cot="none").heldout[0].prompt
