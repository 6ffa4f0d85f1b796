"""`finetune` end to end on a tiny local checkpoint: training, evaluation, reports, checkpoints and exact resume."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch
from safetensors.torch import load_file

from ladder_kernels.finetune import (ADAPTER, CHECKPOINT, LOSS_PNG, RUN_CONFIG, SUMMARY_JSON, SUMMARY_MD, ConfigError,
                                     FinetuneConfig, RunDirError, TrainingRun, load_checkpoint, resume_config)
from tests.tiny_checkpoint import write_tiny_checkpoint

WORDS = {"negative": ("awful", "broken", "hate"), "neutral": ("okay", "average", "plain"), "positive": ("great", "love", "superb")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy shared CPU OpenMP spinning makes them 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory):
    """Sentiment given by one keyword per tweet: learnable by a tiny model in a few dozen steps."""
    rng = random.Random(0)
    rows = []
    for i in range(240):
        label = ("negative", "neutral", "positive")[i % 3]
        rows.append({"text": f"car {i} is {rng.choice(WORDS[label])}", "label": label})
    path = tmp_path_factory.mktemp("data") / "keywords.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(tiny_model, data, out, **kw) -> FinetuneConfig:
    base = dict(model=str(tiny_model), data=str(data), seq_len=32, batch_size=8, steps=6, lr=1e-2, warmup_steps=1,
                reduction_factor=2, eval_samples=24, checkpoint_every=2, dtype="float32", output_dir=str(out))
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def trained_run(tiny_model, keyword_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ladder"
    summary = TrainingRun(_cfg(tiny_model, keyword_data, out, steps=40, checkpoint_every=20)).run()
    return out, summary


def test_training_learns_and_writes_every_report(trained_run):
    out, summary = trained_run
    history = load_checkpoint(out / CHECKPOINT)["history"]
    assert len(history) == 40 and summary["steps"] == 40
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5, history
    assert summary["accuracy_after"] >= 0.6 and summary["accuracy_after"] > summary["accuracy_before"] + 0.2, summary
    assert summary["eval_examples"] == 24 and sum(summary["eval_after"]["predicted"].values()) == 24
    assert summary["tokens_per_second"] > 0 and summary["peak_memory_bytes"] > 0 and summary["train_seconds"] > 0
    assert summary["trainable_parameters"] > 0 and summary["adapter_bytes"] > 0
    assert (out / LOSS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / SUMMARY_JSON).read_text())["accuracy_after"] == summary["accuracy_after"]
    md = (out / SUMMARY_MD).read_text()
    assert "held-out accuracy after" in md and f"{summary['accuracy_after']:.1%}" in md
    assert (out / ADAPTER / "ladder_model.safetensors").is_file() and (out / ADAPTER / "finetune.json").is_file()
    assert not [p.name for p in out.rglob(".tmp*")]  # atomic writes leave no temporaries


def test_adapter_holds_only_the_side_network(trained_run, tiny_model):
    out, summary = trained_run
    side = load_file(out / ADAPTER / "ladder_model.safetensors")
    trainable = load_checkpoint(out / CHECKPOINT)["trainable"]
    assert trainable and all(name.startswith("side.") for name in trainable)
    assert all(torch.equal(side[name.removeprefix("side.")], t) for name, t in trainable.items())
    backbone = load_file(tiny_model / "model.safetensors")
    assert sum(t.numel() for t in side.values()) < sum(t.numel() for t in backbone.values())


class _Interrupt(Exception):
    pass


def _interrupt_at(step_to_stop: int):
    def on_step(step):
        if step == step_to_stop:
            raise _Interrupt
    return on_step


def test_resume_after_a_crash_ends_bit_identical(tiny_model, keyword_data, tmp_path):
    straight = TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "straight")).run()
    crashed = tmp_path / "crashed"
    with pytest.raises(_Interrupt):
        TrainingRun(_cfg(tiny_model, keyword_data, crashed)).run(on_step=_interrupt_at(5))
    assert load_checkpoint(crashed / CHECKPOINT)["step"] == 4  # the crash lost step 5; the checkpoint is step 4
    resumed = TrainingRun(resume_config(crashed, {}), resume=True).run()
    a = load_file(tmp_path / "straight" / ADAPTER / "ladder_model.safetensors")
    b = load_file(crashed / ADAPTER / "ladder_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert load_checkpoint(crashed / CHECKPOINT)["history"] == load_checkpoint(tmp_path / "straight" / CHECKPOINT)["history"]
    assert resumed["accuracy_before"] == straight["accuracy_before"]


def test_a_different_seed_gives_different_weights(tiny_model, keyword_data, tmp_path):
    """The resume test's equality is not vacuous: the data order and init depend on the seed."""
    TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "s0", steps=2)).run()
    TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "s1", steps=2, seed=1)).run()
    a = load_file(tmp_path / "s0" / ADAPTER / "ladder_model.safetensors")
    b = load_file(tmp_path / "s1" / ADAPTER / "ladder_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_time_budget_stops_checkpoints_and_resume_finishes(tiny_model, keyword_data, tmp_path):
    out = tmp_path / "budget"
    summary = TrainingRun(_cfg(tiny_model, keyword_data, out, steps=50, max_minutes=1e-9, checkpoint_every=100)).run()
    assert summary["steps"] == 1 and "--max-minutes" in summary["stopped_early"]
    assert load_checkpoint(out / CHECKPOINT)["step"] == 1 and (out / ADAPTER).is_dir()
    cfg = resume_config(out, {"max_minutes": 60.0, "steps": 50})
    finished = TrainingRun(cfg, resume=True).run()
    assert finished["steps"] == 50 and finished["stopped_early"] is None


def test_resume_refuses_changed_options_and_finished_runs(trained_run, tmp_path):
    out, _ = trained_run
    with pytest.raises(RunDirError, match=r"--lr 0.5 differs from the run"):
        resume_config(out, {"lr": 0.5})
    with pytest.raises(RunDirError, match="already finished"):
        TrainingRun(resume_config(out, {}), resume=True)
    with pytest.raises(RunDirError, match="holds no run to resume"):
        resume_config(tmp_path, {})


def test_output_dir_holding_a_run_is_refused_untouched(trained_run, tiny_model, keyword_data):
    out, _ = trained_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match="already holds another run"):
        TrainingRun(_cfg(tiny_model, keyword_data, out))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("change, needle", [
    ({"seq_len": 4}, "--seq-len must be an integer >= 8"),
    ({"steps": 0}, "--steps must be an integer >= 1"),
    ({"lr": -1.0}, "--lr must be a positive number"),
    ({"method": "lora"}, "--method must be one of ladder, xladder, qlora"),
    ({"xladder_depth": 2}, "--xladder-depth applies to --method xladder only"),
    ({"balance": 2.0}, "--balance must be a number in [0, 1]"),
    ({"eval_samples": 0}, "--eval-samples must be an integer >= 1"),
])
def test_bad_options_name_the_flag(tiny_model, keyword_data, tmp_path, change, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "x", **change))
    assert not (tmp_path / "x").exists()


def test_xladder_runs_with_its_depth(tiny_model, keyword_data, tmp_path):
    summary = TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "x", method="xladder", xladder_depth=1, steps=2)).run()
    assert summary["steps"] == 2
    assert json.loads((tmp_path / "x" / ADAPTER / "ladder_config.json").read_text())["xladder_depth"] == 1


def test_qlora_baseline_trains_lora_only(tiny_model, keyword_data, tmp_path):
    pytest.importorskip("peft")
    summary = TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "q", method="qlora", steps=2, lr=1e-3)).run()
    assert summary["steps"] == 2 and (tmp_path / "q" / ADAPTER / "adapter_model.safetensors").is_file()
    trained = load_checkpoint(tmp_path / "q" / CHECKPOINT)["trainable"]
    assert trained and all("lora_" in n for n in trained)
    from ladder_kernels.generate_cli import load_finetuned

    model, _, info = load_finetuned(tmp_path / "q")  # what `ladder-kernels generate` loads
    assert info["method"] == "qlora"
    restored = dict(model.named_parameters())
    assert all(torch.equal(restored[n].detach().cpu(), t) for n, t in trained.items())
    assert any(t.abs().sum() > 0 for n, t in trained.items() if "lora_B" in n)  # trained, not the zero init


def test_arith_is_scored_by_greedy_generation(tiny_model, tmp_path):
    summary = TrainingRun(FinetuneConfig(model=str(tiny_model), task="arith", seq_len=64, batch_size=4, steps=2,
                                         eval_samples=2, dtype="float32", reduction_factor=2, output_dir=str(tmp_path / "a"))).run()
    assert summary["eval_after"]["n"] == 2 and len(summary["eval_after"]["samples"]) == 2
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    assert json.loads((tmp_path / "a" / RUN_CONFIG).read_text())["config"]["task"] == "arith"


def test_gguf_model_is_converted_once_and_trains(tmp_path, monkeypatch, keyword_data):
    from ladder_kernels.models import resolve_model
    from tests.tiny_checkpoint import write_tiny_gguf

    monkeypatch.setenv("LADDER_KERNELS_CACHE", str(tmp_path / "cache"))
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    converted = resolve_model(gguf_file)
    assert converted.parent == tmp_path / "cache" / "models" and (converted / "model.safetensors").is_file()
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(gguf_file) == converted and (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no temporary folder left behind
    summary = TrainingRun(_cfg(gguf_file, keyword_data, tmp_path / "run", steps=1, eval_samples=3)).run()
    assert summary["steps"] == 1 and summary["model_dir"] == str(converted)


def test_embedded_model_is_found_in_its_package():
    from ladder_kernels.models import embedded_gguf_path

    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_smoothed_loss_tracks_a_constant_and_lags_a_step():
    from ladder_kernels.finetune import smoothed

    assert smoothed([2.0] * 5) == pytest.approx([2.0] * 5)  # bias correction: no pull towards 0
    curve = smoothed([4.0] * 10 + [1.0] * 30)
    assert curve[10] > 1.0 and curve[-1] == pytest.approx(1.0, abs=0.2) and all(a >= b - 1e-9 for a, b in zip(curve, curve[1:]))


def test_ladder_layers_follow_ladder_every_from_the_top():
    from ladder_kernels.finetune import ladder_config

    cfg = FinetuneConfig(ladder_every=3)
    assert ladder_config(cfg, 30).ladder_layers == list(range(2, 30, 3))  # the top layer always feeds a block
    assert ladder_config(FinetuneConfig(ladder_every=1), 30).ladder_layers is None  # every layer
    assert ladder_config(FinetuneConfig(), 30).ladder_layers == list(range(2, 30, 3))  # the default is 3
    xl = ladder_config(FinetuneConfig(method="xladder"), 30)
    assert xl.ladder_layers is None and xl.xladder_depth == 7
