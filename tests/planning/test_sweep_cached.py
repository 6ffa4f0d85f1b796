"""bench/sweep_cached.py: training on cached backbone features is training the LadderModel itself."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter

import pytest
import torch

from ladder_kernels.train.config import FinetuneConfig
from ladder_kernels.train.data import collate, encode_example
from ladder_kernels.train.evaluate import evaluate
from tests.helpers import REPO, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

_spec = importlib.util.spec_from_file_location("sweep_cached", REPO / "bench" / "sweep_cached.py")
sweep_cached = importlib.util.module_from_spec(_spec)
sys.modules["sweep_cached"] = sweep_cached  # dataclasses look their module up there
_spec.loader.exec_module(sweep_cached)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    labels = ("negative", "neutral", "positive")
    words = ("awful day", "the bus came", "lovely news", "so bad", "it is tuesday", "great game", "meh")
    path.write_text(
        "".join(
            json.dumps({"text": f"{words[i % 7]} number {i}", "label": labels[(i * 5) % 3 if i % 4 else 0]}) + "\n"
            for i in range(90)
        ),
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def sweep(tiny_model, data_file):
    cfg = FinetuneConfig(
        model=str(tiny_model),
        data=str(data_file),
        steps=4,
        batch_size=6,
        seq_len=24,
        reduction_factor=2,
        dtype="float32",
    )
    return sweep_cached.Sweep(cfg, eval_samples=9)


def _perturbed(sweep):
    """A side network away from its initialisation (so predictions and gradients are not degenerate)."""
    model = sweep.build(sweep_cached.Variant())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.side.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_loss_and_gradients_match_the_models_own_forward(sweep):
    model = _perturbed(sweep)
    batch_ids = sweep.order[1]
    encoded = [
        encode_example(sweep.tokenizer, sweep.dataset.train[i], sweep.cfg.seq_len, add_eos=False)[:2] for i in batch_ids
    ]
    batch = collate(encoded, sweep.tokenizer.pad_token_id)
    assert not bool(batch["attention_mask"].all())  # ragged: padding is exercised

    reference = model(**batch).loss
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.side.named_parameters()}
    model.zero_grad(set_to_none=True)

    H, mask = sweep_cached.stack_features([sweep.train[i][1] for i in batch_ids])
    assert torch.equal(mask, batch["attention_mask"])
    loss = sweep.loss(model, H, mask, batch["labels"])
    loss.backward()
    assert abs(loss.item() - reference.item()) <= 1e-5 * abs(reference.item())
    for name, p in model.side.named_parameters():
        assert ref_grads[name].abs().sum() > 0, name
        assert rel_err(p.grad, ref_grads[name]) < 1e-4, name


def test_accuracy_matches_finetune_evaluation(sweep):
    model = _perturbed(sweep)
    ours = sweep.accuracy(model)
    theirs = evaluate(model, sweep.tokenizer, sweep.dataset, sweep.dataset.heldout[:9], sweep.cfg.seq_len, 4, "eval")
    assert ours == pytest.approx(theirs["accuracy"])


def test_other_orders_permute_examples_within_each_class(sweep):
    label_of = lambda i: int(sweep.train[i][0][-1])  # noqa: E731
    first = [i for batch in sweep.data_order(0) for i in batch]
    for order in (1, 2):
        other = [i for batch in sweep.data_order(order) for i in batch]
        assert [label_of(i) for i in other] == [label_of(i) for i in first]  # every slot keeps its class
        assert Counter(other) == Counter(first)
    assert sweep.data_order(1) != sweep.data_order(2)


def test_main_writes_a_table_per_variant(tiny_model, data_file, tmp_path):
    out = tmp_path / "sweep"
    args = [
        "--model",
        str(tiny_model),
        "--data",
        str(data_file),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--seq-len",
        "24",
        "--variants",
        "default,lr3e-3,3_passes,3_steps_per_batch",
        "--orders",
        "2",
        "--eval-samples",
        "6",
        "--out",
        str(out),
    ]
    assert sweep_cached.main(args) == 0
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert set(results) == {"default", "lr3e-3", "3_passes", "3_steps_per_batch"}
    # three passes over the same batches, or three steps on each, fit them better than one
    for more in ("3_passes", "3_steps_per_batch"):
        assert all(m["final_loss"] < d["final_loss"] for m, d in zip(results[more], results["default"])), results
    assert all(
        len(runs) == 2 and all(0 <= r["accuracy"] <= 1 and r["final_loss"] > 0 for r in runs)
        for runs in results.values()
    )
    table = out.with_suffix(".md").read_text()
    assert "| default |" in table and '| lr3e-3 | `{"lr": 0.003, "lr_rule": "uniform"}` |' in table


def test_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit):
        sweep_cached.main(["--variants", "nope"])
    assert "--variants: unknown ['nope']" in capsys.readouterr().err


def test_largest_spike_is_the_worst_later_loss_over_the_first_five():
    assert sweep_cached.largest_spike([5.0, 3.0, 4.0, 4.0, 4.0, 10.0, 2.0, 6.0]) == pytest.approx(2.5)
    assert sweep_cached.largest_spike([4.0, 4.0, 4.0, 4.0, 4.0, 1.0]) == pytest.approx(0.25)
    assert sweep_cached.largest_spike([4.0, 4.0]) == 0.0  # too short to say


def test_features_come_back_in_the_rows_order():
    """backbone_features runs the rows grouped by length; each row's features are its own, in the input order."""
    from ladder_kernels.nn.config import LadderConfig
    from ladder_kernels.nn.ladder import LadderModel
    from tests.helpers import tiny_backbone

    torch.manual_seed(0)
    model = LadderModel(tiny_backbone(num_layers=3), LadderConfig(reduction_factor=2, backbone_quant="none"))
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (9, 3, 14, 5, 3, 11)]
    feats = sweep_cached.backbone_features(model, rows, 0, [-1, 1], batch_size=2)
    for r, f in zip(rows, feats):
        alone = sweep_cached.backbone_features(model, [r], 0, [-1, 1], batch_size=1)[0]
        assert f.shape == alone.shape and rel_err(f, alone) < 1e-5
