"""Generation evaluation: batched, left-padded greedy decoding gives exactly the tokens of one prompt at a time;
rows stop at EOS and at the answer's end; the eval dict reports tokens per answer and wall time."""

from __future__ import annotations

import random

import pytest
import torch

from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.ladder import LadderModel
from ladder_kernels.train.data import (
    Dataset,
    Example,
    arith_problem,
    encode_prompts,
    label_first_tokens,
    sentiment_prompt,
)
from ladder_kernels.train.evaluate import _cut, answer_end, evaluate, greedy_answers, greedy_complete
from tests.helpers import tiny_backbone, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = tiny_tokenizer()
    backbone = tiny_backbone("llama", num_layers=3, vocab_size=len(tokenizer))
    model = LadderModel(backbone, LadderConfig(reduction_factor=2, xladder_depth=1, backbone_quant="none"))
    with torch.no_grad(), torch.random.fork_rng():  # a side network that changes the output (up_proj starts at 0)
        torch.manual_seed(3)
        for p in model.side.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval(), tokenizer


def _prompts(tokenizer, n: int) -> list[list[int]]:
    rng = random.Random(5)
    prompts = encode_prompts(tokenizer, [arith_problem(rng).prompt for _ in range(n)], 96)
    prompts[1] = prompts[1][-7:]  # very different lengths: much left padding in the batch
    assert len({len(p) for p in prompts}) > 3
    return prompts


def test_batched_greedy_equals_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer, 7)
    limits = [12, 5, 12, 9, 12, 1, 12]
    one = greedy_answers(model, tokenizer, prompts, limits, batch_size=1, stop_at_answer=False)
    batched = greedy_answers(model, tokenizer, prompts, limits, batch_size=4, stop_at_answer=False)
    assert batched == one
    assert [n for _, n in one] == limits  # this random model never emits EOS: every row runs to its own limit
    for ids, limit, (text, _) in zip(prompts, limits, one):  # and the old unpadded one-prompt path agrees
        assert greedy_complete(model, tokenizer, ids, limit) == text


def test_batched_greedy_equals_one_at_a_time_for_a_peft_model(model_and_tokenizer):
    """HF generate (QLoRA / peft models) takes the same left-padded batches."""
    peft = pytest.importorskip("peft")
    _, tokenizer = model_and_tokenizer
    base = tiny_backbone("llama", num_layers=2, vocab_size=len(tokenizer))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    prompts = _prompts(tokenizer, 5)
    limits = [8, 3, 8, 6, 8]
    one = greedy_answers(model, tokenizer, prompts, limits, batch_size=1, stop_at_answer=False)
    assert greedy_answers(model, tokenizer, prompts, limits, batch_size=5, stop_at_answer=False) == one
    assert [n for _, n in one] == limits


def test_rows_stop_at_eos_and_at_the_answer_end():
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    body = tokenizer(" 3 + 4 = 7. The answer is 7. And then", add_special_tokens=False)["input_ids"]
    text, n = _cut(tokenizer, body + [eos] + body, {eos}, stop_at_answer=False)
    assert n == len(body) and text.endswith("And then")
    text, n = _cut(tokenizer, body, {eos}, stop_at_answer=True)
    assert text == " 3 + 4 = 7. The answer is 7." and n < len(body)
    assert answer_end(tokenizer.decode(body[: n - 1])) is None  # n is the fewest tokens holding the answer
    assert answer_end("The answer is 12") is None and answer_end("x The answer is -3.") == len("x The answer is -3.")


def test_generation_eval_reports_tokens_and_wall_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rng = random.Random(9)
    examples = [arith_problem(rng, "none") for _ in range(3)]
    dataset = Dataset("arith", (), tuple(examples), None, "test")
    result = evaluate(model, tokenizer, dataset, examples, 96, 2, "")
    limits = [2 * len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + 8 for ex in examples]
    assert result["n"] == 3 and 0 <= result["accuracy"] <= 1
    assert result["mean_generated_tokens"] == pytest.approx(sum(limits) / 3)  # never stops: all limits used
    assert result["eval_seconds"] > 0


@pytest.mark.parametrize("kind", ["ladder", "peft"])
def test_classification_scores_each_rows_last_token(model_and_tokenizer, kind):
    """Batches of ragged lengths score every row at its own last token (the logits of the last positions only):
    labelling each example with what its full-logits forward alone predicts gives accuracy 1, any other label 0."""
    ladder, tokenizer = model_and_tokenizer
    model = ladder
    if kind == "peft":
        peft = pytest.importorskip("peft")
        torch.manual_seed(4)
        base = tiny_backbone("llama", num_layers=2, vocab_size=len(tokenizer))
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    labels = ("negative", "neutral", "positive")
    label_ids = torch.tensor(label_first_tokens(tokenizer, labels))
    rng = random.Random(11)
    texts = [" ".join(rng.choice("abcdefgh") * rng.randint(1, 4) for _ in range(rng.randint(1, 12))) for _ in range(9)]
    prompts = [sentiment_prompt(t, labels) for t in texts]
    alone = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p)["input_ids"]])
        with torch.no_grad():
            alone.append(labels[int(model(input_ids=ids).logits[0, -1, label_ids].argmax())])
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 4 and len(set(alone)) > 1
    for shift, expected in ((0, 1.0), (1, 0.0)):
        examples = [Example(p, " " + labels[(labels.index(a) + shift) % 3]) for p, a in zip(prompts, alone)]
        dataset = Dataset("sentiment", (), tuple(examples), labels, "test")
        assert evaluate(model, tokenizer, dataset, examples, 96, 4, "")["accuracy"] == expected
