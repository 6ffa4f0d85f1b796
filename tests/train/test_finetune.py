"""`finetune` end to end on a tiny local checkpoint: training, evaluation, reports, checkpoints and exact resume
(after an exception, and after SIGKILL of a real process between checkpoints or during a checkpoint write), a
NaN/Inf loss or gradient (stop or --skip-nonfinite), and out of memory."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from safetensors.torch import load_file

from ladder_kernels.backends import cpu_has_native_bf16
from ladder_kernels.defaults import CPU_BF16_ENV
from ladder_kernels.errors import ConfigError, RunDirError, TrainingError
from ladder_kernels.planning.cot_bench import cold_train_seconds
from ladder_kernels.train.checkpoint import load_checkpoint
from ladder_kernels.train.config import FinetuneConfig
from ladder_kernels.train.run import TrainingRun
from ladder_kernels.train.run import build_model as _real_build_model
from ladder_kernels.train.run_dir import (
    ADAPTER,
    CHECKPOINT,
    LOSS_PNG,
    RUN_CONFIG,
    SUMMARY_JSON,
    SUMMARY_MD,
    resume_config,
)
from tests.helpers import REPO

WORDS = {
    "negative": ("awful", "broken", "hate"),
    "neutral": ("okay", "average", "plain"),
    "positive": ("great", "love", "superb"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


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
    base = dict(
        model=str(tiny_model),
        data=str(data),
        seq_len=32,
        batch_size=8,
        steps=6,
        lr=1e-2,
        lr_rule="uniform",  # these tiny runs were tuned with one absolute rate
        epochs=1,  # one pass, the backbone every step (the cache has its own tests)
        warmup_steps=1,
        reduction_factor=2,
        eval_samples=24,
        checkpoint_every=2,
        dtype="float32",
        output_dir=str(out),
    )
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
    assert summary["loss_history"] == history  # the divergence guard's record
    spike = summary["largest_loss_spike"]
    assert spike["step"] > 5 and spike["ratio"] == max(
        history[i] / (sum(history[max(0, i - 20) : i]) / len(history[max(0, i - 20) : i])) for i in range(5, 40)
    )
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5, history
    assert summary["accuracy_after"] >= 0.6 and summary["accuracy_after"] > summary["accuracy_before"] + 0.2, summary
    assert summary["eval_examples"] == 24 and sum(summary["eval_after"]["predicted"].values()) == 24
    assert summary["tokens_per_second"] > 0 and summary["peak_memory_bytes"] > 0 and summary["train_seconds"] > 0
    assert summary["trainable_parameters"] > 0 and summary["adapter_bytes"] > 0
    assert (out / LOSS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / SUMMARY_JSON).read_text())["accuracy_after"] == summary["accuracy_after"]
    md = (out / SUMMARY_MD).read_text()
    assert "held-out accuracy after" in md and f"{summary['accuracy_after']:.1%}" in md
    assert "largest loss spike" in md and f"{spike['ratio']:.2f}x the mean of the steps before it" in md
    assert (out / ADAPTER / "ladder_model.safetensors").is_file() and (out / ADAPTER / "finetune.json").is_file()
    assert not [p.name for p in out.rglob(".tmp*")]  # atomic writes leave no temporaries


def test_evaluate_command_reloads_the_adapter_to_the_same_accuracy(trained_run, keyword_data, tmp_path, capsys):
    from ladder_kernels.cli import main

    out, summary = trained_run
    result_file = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--adapter",
                str(out),
                "--data",
                str(keyword_data),
                "--eval-samples",
                "24",
                "--seq-len",
                "32",
                "--json",
                str(result_file),
            ]
        )
        == 0
    )
    result = json.loads(result_file.read_text())
    assert result["n"] == 24 and result["accuracy"] == summary["accuracy_after"]
    assert result["predicted"] == summary["eval_after"]["predicted"]
    assert f"held-out accuracy {summary['accuracy_after']:.1%} on 24 examples" in capsys.readouterr().out


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
    assert (
        load_checkpoint(crashed / CHECKPOINT)["history"]
        == load_checkpoint(tmp_path / "straight" / CHECKPOINT)["history"]
    )
    assert resumed["accuracy_before"] == straight["accuracy_before"]


def test_steps_per_batch_runs_the_backbone_once_per_batch_and_resumes_exactly(tiny_model, keyword_data, tmp_path):
    """--steps-per-batch 3: steps 1-3 train on batch 0 and 4-6 on batch 1, the backbone running at steps 1 and 4
    only; killed at step 5 (mid-batch, last checkpoint at step 4), --resume recomputes batch 1's backbone outputs
    and ends bit-identical."""
    runs = {}
    for name in ("straight", "crashed"):
        run = TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / name, steps_per_batch=3))
        calls, after_step = [], []
        run.model.backbone.model.layers[0].register_forward_hook(lambda *a: calls.append(1))

        def on_step(step, calls=calls, after_step=after_step, crash=(name == "crashed")):
            after_step.append(len(calls))
            if crash and step == 5:
                raise _Interrupt

        if name == "crashed":
            with pytest.raises(_Interrupt):
                run.run(on_step=on_step)
        else:
            run.run(on_step=on_step)
        runs[name] = after_step
    assert [b - a for a, b in zip(runs["straight"], runs["straight"][1:6])] == [0, 0, 1, 0, 0]
    assert load_checkpoint(tmp_path / "crashed" / CHECKPOINT)["step"] == 4
    TrainingRun(resume_config(tmp_path / "crashed", {}), resume=True).run()
    a = load_file(tmp_path / "straight" / ADAPTER / "ladder_model.safetensors")
    b = load_file(tmp_path / "crashed" / ADAPTER / "ladder_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "one", steps=6)).run()  # control: one step per batch differs
    c = load_file(tmp_path / "one" / ADAPTER / "ladder_model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _counted_run(cfg, monkeypatch, crash_at=None, resume=False):
    """Run `cfg`, counting backbone forwards (calls of its first layer): (summary, the count after each step, the
    count inside the caching pass, the trainable weights after each step)."""
    from ladder_kernels.train import state_cache

    run = TrainingRun(cfg, resume=resume)
    calls, after, weights, in_build = [], [], [], []
    run.model.backbone.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    build = state_cache.build_cache

    def counted_build(*args, **kw):
        before = len(calls)
        seconds = build(*args, **kw)
        in_build.append(len(calls) - before)
        return seconds

    monkeypatch.setattr(state_cache, "build_cache", counted_build)

    def on_step(step):
        after.append(len(calls))
        weights.append({n: p.detach().clone() for n, p in run.params.items()})
        if step == crash_at:
            raise _Interrupt

    if crash_at is None:
        return run.run(on_step=on_step), after, in_build, weights
    with pytest.raises(_Interrupt):
        run.run(on_step=on_step)
    return None, after, in_build, weights


def test_epochs_train_from_one_backbone_pass_reuse_the_cache_and_resume_exactly(
    tiny_model, keyword_data, tmp_path, monkeypatch
):
    """--steps 4 --epochs 3: one backbone pass over epoch 1's 4 batches before training, none in its 12 steps; a run
    with another lr on the same data reuses the cache (no backbone pass at all); a run killed at step 7 (epoch 2, last
    checkpoint at step 6) resumes, from the same cache, to the same weights."""
    kw = dict(steps=4, epochs=3, cache_dir=str(tmp_path / "cache"))
    straight, after, in_build, _ = _counted_run(
        _cfg(tiny_model, keyword_data, tmp_path / "straight", **kw), monkeypatch
    )
    assert in_build == [4] and len(after) == 12 and len(set(after)) == 1  # no backbone forward in any step
    assert straight["steps"] == 12 and straight["epochs"] == 3 and straight["steps_planned"] == 12
    cache = straight["state_cache"]
    assert not cache["reused"] and cache["replayed_batches"] == 12 and cache["examples"] == 4 * 8
    assert cache["bytes"] > cache["bytes_per_example"] * cache["examples"] > 0 and cache["build_seconds"] > 0
    assert cache["backbone_seconds_saved"] == pytest.approx(
        cache["backbone_seconds_per_batch"] * 12 - cache["build_seconds"]
    )
    history = load_checkpoint(tmp_path / "straight" / CHECKPOINT)["history"]
    assert len(history) == 12 and sum(history[-4:]) < sum(history[:4])  # later epochs still learn
    assert "backbone-state cache (3 epochs)" in (tmp_path / "straight" / SUMMARY_MD).read_text()

    sweep, after_sweep, in_build, _ = _counted_run(
        _cfg(tiny_model, keyword_data, tmp_path / "sweep", lr=2e-2, **kw), monkeypatch
    )
    assert in_build == [] and sweep["state_cache"]["reused"] and sweep["state_cache"]["path"] == cache["path"]
    # the reused cache still reports what its build cost (bench --cot's equal-time budgets add it back)
    assert sweep["state_cache"]["build_seconds"] == 0
    assert 0 < sweep["state_cache"]["first_build_seconds"] == cache["first_build_seconds"] <= cache["build_seconds"]
    assert cold_train_seconds(sweep) == sweep["train_seconds"] + cache["first_build_seconds"]
    assert cold_train_seconds(straight) == straight["train_seconds"]
    assert after_sweep == [after[0] - 4] * 12  # the zero-shot evaluation's forwards only
    assert not _same(_adapter(tmp_path / "sweep"), _adapter(tmp_path / "straight"))

    _counted_run(_cfg(tiny_model, keyword_data, tmp_path / "crashed", **kw), monkeypatch, crash_at=7)
    assert load_checkpoint(tmp_path / "crashed" / CHECKPOINT)["step"] == 6
    resumed, *_ = _counted_run(resume_config(tmp_path / "crashed", {}), monkeypatch, resume=True)
    assert resumed["resumed_from_step"] == 6 and resumed["state_cache"]["reused"]
    assert _same(_adapter(tmp_path / "crashed"), _adapter(tmp_path / "straight"))
    assert load_checkpoint(tmp_path / "crashed" / CHECKPOINT)["history"] == history


def test_the_first_epoch_from_the_cache_trains_bitwise_as_the_backbone_in_bf16(
    tiny_model, keyword_data, tmp_path, monkeypatch
):
    """bf16 backbone, bf16 storage: --steps 3 --epochs 2 and a plain --steps 6 run share the schedule and their first 3
    batches, so after 3 steps their weights are bitwise equal; the epoch-2 reshuffle then makes them differ."""
    kw = dict(dtype="bfloat16", ladder_storage="bf16")
    _, _, _, cached = _counted_run(
        _cfg(tiny_model, keyword_data, tmp_path / "cached", steps=3, epochs=2, cache_dir=str(tmp_path / "c"), **kw),
        monkeypatch,
    )
    _, _, _, plain = _counted_run(_cfg(tiny_model, keyword_data, tmp_path / "plain", steps=6, **kw), monkeypatch)
    assert _same(cached[2], plain[2]) and not _same(cached[0], plain[2])
    assert not _same(cached[5], plain[5])


def test_epochs_with_steps_per_batch_cache_the_batches_of_one_epoch(tiny_model, keyword_data, tmp_path, monkeypatch):
    """--steps 4 --steps-per-batch 2 --epochs 2: epoch 1 reads 2 batches (the caching pass runs 2 micro-batches),
    each epoch trains 2 steps on each of its 2 batches, 8 steps in all."""
    cfg = _cfg(tiny_model, keyword_data, tmp_path / "r", steps=4, steps_per_batch=2, epochs=2, cache_dir=str(tmp_path))
    summary, after, in_build, weights = _counted_run(cfg, monkeypatch)
    assert in_build == [2] and len(set(after)) == 1 and summary["steps"] == 8
    assert summary["state_cache"]["examples"] == 2 * 8 and summary["state_cache"]["replayed_batches"] == 4


def _adapter(out):
    return load_file(out / ADAPTER / "ladder_model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


def test_a_resumed_run_keeps_the_defaults_it_started_with(tiny_model, keyword_data, tmp_path, monkeypatch):
    """A run saves its configuration with the method's defaults written in: resumed after DEFAULT_STEPS and
    DEFAULT_EPOCHS change, it still finishes the run it started (and so the same cache and schedule)."""
    from ladder_kernels import defaults

    out = tmp_path / "run"
    cfg = _cfg(
        tiny_model,
        keyword_data,
        out,
        steps=None,
        epochs=None,
        lr=None,
        warmup_steps=None,
        max_minutes=1e-9,
        cache_dir=str(tmp_path / "cache"),
    )
    monkeypatch.setitem(defaults.DEFAULT_STEPS, "ladder", 3)
    monkeypatch.setitem(defaults.DEFAULT_EPOCHS, "ladder", 2)
    assert TrainingRun(cfg).run()["steps"] == 1  # stopped by --max-minutes after its first step
    monkeypatch.setitem(defaults.DEFAULT_STEPS, "ladder", 5)
    monkeypatch.setitem(defaults.DEFAULT_EPOCHS, "ladder", 4)
    resumed = resume_config(out, {"max_minutes": 60.0})
    assert (resumed.steps, resumed.epochs, resumed.warmup_steps) == (3, 2, 1)
    assert resumed.lr == FinetuneConfig(lr_rule="uniform").learning_rate
    finished = TrainingRun(resumed, resume=True).run()
    assert finished["steps"] == 6 and finished["steps_planned"] == 6 and finished["epochs"] == 2


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


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"seq_len": 4}, "--seq-len must be an integer >= 8"),
        ({"steps": 0}, "--steps must be an integer >= 1"),
        ({"lr": -1.0}, "--lr must be a positive number"),
        ({"method": "lora"}, "--method must be one of ladder, xladder, qlora"),
        ({"xladder_depth": 2}, "--xladder-depth applies to --method xladder only"),
        ({"balance": 2.0}, "--balance must be a number in [0, 1]"),
        ({"eval_samples": 0}, "--eval-samples must be an integer >= 1"),
        ({"steps_per_batch": 0}, "--steps-per-batch must be an integer >= 1"),
        ({"steps_per_batch": 2, "method": "qlora"}, "--steps-per-batch applies to --method ladder and xladder"),
        ({"epochs": 0}, "--epochs must be an integer >= 1"),
        ({"epochs": 2, "method": "qlora"}, "--epochs applies to --method ladder and xladder"),
        ({"cache_memory": "lots"}, "--cache-memory must be a size such as 512MB"),
        ({"warmup_steps": -1}, "--warmup-steps must be an integer >= 0"),
    ],
)
def test_bad_options_name_the_flag(tiny_model, keyword_data, tmp_path, change, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "x", **change))
    assert not (tmp_path / "x").exists()


def test_xladder_runs_with_its_depth(tiny_model, keyword_data, tmp_path):
    summary = TrainingRun(
        _cfg(tiny_model, keyword_data, tmp_path / "x", method="xladder", xladder_depth=1, steps=2)
    ).run()
    assert summary["steps"] == 2
    assert json.loads((tmp_path / "x" / ADAPTER / "ladder_config.json").read_text())["xladder_depth"] == 1


def test_qlora_baseline_trains_lora_only(tiny_model, keyword_data, tmp_path):
    pytest.importorskip("peft")
    summary = TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "q", method="qlora", steps=2, lr=1e-3)).run()
    assert summary["steps"] == 2 and (tmp_path / "q" / ADAPTER / "adapter_model.safetensors").is_file()
    trained = load_checkpoint(tmp_path / "q" / CHECKPOINT)["trainable"]
    assert trained and all("lora_" in n for n in trained)
    from ladder_kernels.cli.generate import load_finetuned

    model, _, info = load_finetuned(tmp_path / "q")  # what `ladder-kernels generate` loads
    assert info["method"] == "qlora"
    restored = dict(model.named_parameters())
    assert all(torch.equal(restored[n].detach().cpu(), t) for n, t in trained.items())
    assert any(t.abs().sum() > 0 for n, t in trained.items() if "lora_B" in n)  # trained, not the zero init


def test_arith_is_scored_by_greedy_generation(tiny_model, tmp_path):
    summary = TrainingRun(
        FinetuneConfig(
            model=str(tiny_model),
            task="arith",
            seq_len=64,
            batch_size=4,
            steps=2,
            eval_samples=2,
            dtype="float32",
            reduction_factor=2,
            output_dir=str(tmp_path / "a"),
        )
    ).run()
    assert summary["eval_after"]["n"] == 2 and len(summary["eval_after"]["samples"]) == 2
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    assert json.loads((tmp_path / "a" / RUN_CONFIG).read_text())["config"]["task"] == "arith"


def test_gguf_model_is_converted_once_and_trains(tmp_path, monkeypatch, keyword_data):
    from ladder_kernels.train.backbones import resolve_model
    from tests.helpers import write_tiny_gguf

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
    from ladder_kernels.train.backbones import embedded_gguf_path

    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_warmup_defaults_to_a_tenth_of_the_runs_steps():
    from ladder_kernels.train.config import FinetuneConfig
    from ladder_kernels.train.run import warmup_cosine

    assert FinetuneConfig().total_steps == 300 and FinetuneConfig().warmup_in_effect == 30  # ladder: 100 x 3 epochs
    assert FinetuneConfig(method="qlora").total_steps == 100  # one pass of 100
    assert FinetuneConfig(method="qlora").warmup_in_effect == 10
    assert FinetuneConfig(steps=40, epochs=1).warmup_in_effect == 4
    assert FinetuneConfig(warmup_steps=0).warmup_in_effect == 0  # given: kept
    factors = [warmup_cosine(FinetuneConfig().warmup_in_effect, 300)(s) for s in range(300)]
    assert factors.index(max(factors)) == 30 and all(a < b for a, b in zip(factors[:30], factors[1:31]))


@pytest.mark.parametrize("native, expected", [("1", "bfloat16"), ("0", "float32")])
def test_auto_matmul_dtype_is_bf16_on_a_cpu_with_native_bf16(native, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(CPU_BF16_ENV, native)
    cfg = FinetuneConfig()
    assert (cfg.dtype_name, cfg.matmul_dtype_name) == ("float32", expected)
    assert FinetuneConfig(method="xladder").matmul_dtype_name == expected
    assert FinetuneConfig(method="qlora").matmul_dtype_name == "float32"  # QLoRA computes in --dtype
    assert FinetuneConfig(matmul_dtype="float32").matmul_dtype_name == "float32"  # given: kept
    assert FinetuneConfig(dtype="bfloat16").matmul_dtype_name == "bfloat16"
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=f"{CPU_BF16_ENV} must be 0 or 1"):
        FinetuneConfig().matmul_dtype_name


def test_bf16_matmuls_in_an_fp32_run_train_and_reload_as_trained(tiny_model, keyword_data, tmp_path):
    """--matmul-dtype bfloat16: the backbone's NF4 layers multiply in bf16 (their outputs, the side network and the
    loss stay fp32), the cache is keyed by it, and `evaluate` reloads the adapter with the same matmuls."""
    from ladder_kernels.nn.nf4_linear import NF4Linear
    from ladder_kernels.train.run_dir import load_finetuned

    kw = dict(steps=3, epochs=2, eval_samples=8, cache_dir=str(tmp_path / "cache"))
    run = TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "bf16", matmul_dtype="bfloat16", **kw))
    layers = [m for m in run.model.backbone.modules() if isinstance(m, NF4Linear)]
    assert layers and {m.compute_dtype for m in layers} == {torch.bfloat16}
    summary = run.run()
    assert (summary["dtype"], summary["matmul_dtype"]) == ("float32", "bfloat16") and math.isfinite(
        summary["final_loss"]
    )
    assert "4-bit matmuls in bfloat16" in (tmp_path / "bf16" / "summary.md").read_text()
    model, _, _ = load_finetuned(tmp_path / "bf16")
    assert {m.compute_dtype for m in model.backbone.modules() if isinstance(m, NF4Linear)} == {torch.bfloat16}
    fp32 = TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "fp32", matmul_dtype="float32", **kw)).run()
    assert fp32["state_cache"]["path"] != summary["state_cache"]["path"]  # not read from the bf16 run's cache
    assert fp32["loss_history"] != summary["loss_history"]


def test_native_bf16_probe_agrees_with_the_cpu_flags(monkeypatch):
    flags = re.search(r"^flags\s*:(.*)$", open("/proc/cpuinfo").read(), re.M).group(1).split()
    monkeypatch.delenv(CPU_BF16_ENV)
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags)), flags


def test_smoothed_loss_tracks_a_constant_and_lags_a_step():
    from ladder_kernels.train.report import smoothed

    assert smoothed([2.0] * 5) == pytest.approx([2.0] * 5)  # bias correction: no pull towards 0
    curve = smoothed([4.0] * 10 + [1.0] * 30)
    assert (
        curve[10] > 1.0
        and curve[-1] == pytest.approx(1.0, abs=0.2)
        and all(a >= b - 1e-9 for a, b in zip(curve, curve[1:]))
    )


def test_ladder_layers_follow_ladder_every_from_the_top():
    from ladder_kernels.train.config import ladder_config

    cfg = FinetuneConfig(ladder_every=3)
    assert ladder_config(cfg, 30).ladder_layers == list(range(2, 30, 3))  # the top layer always feeds a block
    assert ladder_config(FinetuneConfig(ladder_every=1), 30).ladder_layers is None  # every layer
    assert ladder_config(FinetuneConfig(), 30).ladder_layers == list(range(2, 30, 3))  # the default is 3
    xl = ladder_config(FinetuneConfig(method="xladder"), 30)
    assert xl.ladder_layers is None and xl.xladder_depth == 7


# --- non-finite loss / gradient, out of memory ---------------------------------------------------------------


class _NanGradient(torch.autograd.Function):
    """The identity whose gradient is NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poisoned_build(monkeypatch, nan_loss_at=(), nan_grad_at=()):
    """build_model whose model gives a NaN loss (or finite loss, NaN gradient) on these training forwards (1-based
    counts of forwards with labels, in this process)."""
    import ladder_kernels.train.run as finetune

    def build(cfg, model_dir):
        model = _real_build_model(cfg, model_dir)
        real_forward, calls = model.forward, [0]

        def forward(*args, **kwargs):
            out = real_forward(*args, **kwargs)
            if kwargs.get("labels") is not None:
                calls[0] += 1
                if calls[0] in nan_loss_at:
                    out.loss = out.loss * float("nan")
                if calls[0] in nan_grad_at:
                    out.loss = _NanGradient.apply(out.loss)
            return out

        model.forward = forward
        return model

    monkeypatch.setattr(finetune, "build_model", build)


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    tiny_model, keyword_data, tmp_path, monkeypatch, capsys
):
    from ladder_kernels.cli import main

    _poisoned_build(monkeypatch, nan_loss_at={4})  # step 4 would write a checkpoint (--checkpoint-every 2)
    out = tmp_path / "nan"
    args = [
        "finetune",
        "--model",
        str(tiny_model),
        "--data",
        str(keyword_data),
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--steps",
        "6",
        "--epochs",
        "1",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "1",
        "--reduction-factor",
        "2",
        "--eval-samples",
        "6",
        "--checkpoint-every",
        "2",
        "--dtype",
        "float32",
        "--output-dir",
        str(out),
    ]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ladder-kernels finetune: error: step 4 of 6: the training loss is nan"), err
    assert "step 2) is kept" in err and "--skip-nonfinite" in err
    saved = load_checkpoint(out / CHECKPOINT)
    assert saved["step"] == 2 and all(torch.isfinite(t).all() for t in saved["trainable"].values())
    assert not (out / ADAPTER).exists() and not (out / SUMMARY_JSON).exists()

    # Continuing with --skip-nonfinite: step 4 (this process's second training forward) is skipped, the rest trains.
    _poisoned_build(monkeypatch, nan_loss_at={2})
    assert main(["finetune", "--resume", "--output-dir", str(out), "--skip-nonfinite"]) == 0
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert summary["steps"] == 6 and summary["skipped_steps"] == [4] and summary["config"]["skip_nonfinite"] is True
    assert math.isfinite(summary["final_loss"]) and "1 skipped" in (out / SUMMARY_MD).read_text()


def test_skip_nonfinite_skips_the_optimizer_step(tiny_model, keyword_data, tmp_path, monkeypatch):
    _poisoned_build(monkeypatch, nan_loss_at={3}, nan_grad_at={5})
    run = TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "skip", skip_nonfinite=True))
    weights = {}
    summary = run.run(
        on_step=lambda step: weights.update({step: {n: p.detach().clone() for n, p in run.params.items()}})
    )
    assert summary["steps"] == 6 and summary["skipped_steps"] == [3, 5]
    history = load_checkpoint(tmp_path / "skip" / CHECKPOINT)["history"]
    assert [math.isfinite(v) for v in history] == [True, True, False, True, True, True]  # step 5's loss was finite
    for skipped in (3, 5):  # no optimizer step: the weights are those of the step before
        assert all(torch.equal(weights[skipped][n], weights[skipped - 1][n]) for n in run.params)
    assert any(not torch.equal(weights[4][n], weights[3][n]) for n in run.params)
    assert all(torch.isfinite(p).all() for p in run.params.values())


def test_skip_nonfinite_is_a_boolean_flag_on_the_command_line():
    from ladder_kernels.cli import build_parser
    from ladder_kernels.cli.finetune import given_options

    parse = lambda *a: FinetuneConfig(**given_options(build_parser().parse_args(["finetune", *a])))  # noqa: E731
    assert parse("--skip-nonfinite").skip_nonfinite is True and parse("--no-skip-nonfinite").skip_nonfinite is False
    assert parse().skip_nonfinite is False
    command = FinetuneConfig(skip_nonfinite=True, steps=3).command_line()
    assert command.endswith("--steps 3 --skip-nonfinite")
    assert parse(*command.split()[2:]) == FinetuneConfig(skip_nonfinite=True, steps=3)
    with pytest.raises(ConfigError, match="--skip-nonfinite must be true or false"):
        FinetuneConfig(skip_nonfinite="yes").validate()


def _out_of_memory_at(monkeypatch, step: int):
    real_step = TrainingRun._train_step

    def train_step(self, state):
        if state["step"] + 1 == step:
            torch.ones(4)  # a tensor alive in the failing frame
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real_step(self, state)

    monkeypatch.setattr(TrainingRun, "_train_step", train_step)


def test_out_of_memory_names_the_settings_and_the_plan(tiny_model, keyword_data, tmp_path, monkeypatch, capsys):
    from ladder_kernels.cli import main

    _out_of_memory_at(monkeypatch, 3)
    out = tmp_path / "oom"
    args = [
        "finetune",
        "--model",
        str(tiny_model),
        "--data",
        str(keyword_data),
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--steps",
        "6",
        "--epochs",
        "1",
        "--reduction-factor",
        "2",
        "--eval-samples",
        "3",
        "--checkpoint-every",
        "2",
        "--dtype",
        "float32",
        "--output-dir",
        str(out),
    ]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("ladder-kernels finetune: error: out of memory at step 3 of 6"), message
    for setting in (
        "--batch-size 8",
        "--grad-accum 1",
        "--seq-len 32",
        "--ladder-storage int8",
        "--reduction-factor 2",
    ):
        assert setting in message, (setting, message)
    predicted = re.search(
        r"`ladder-kernels plan` predicts a peak of ([\d.e+-]+) GiB \(a GPU needs ([\d.e+-]+) GiB\) "
        r"for ladder at --seq-len 32, batch 8",
        message,
    )
    assert predicted and 0 < float(predicted.group(1)) < float(predicted.group(2)), message
    assert load_checkpoint(out / CHECKPOINT)["step"] == 2  # the last checkpoint stays; --resume continues


def test_out_of_memory_says_so_when_planning_fails_too(tiny_model, keyword_data, tmp_path, monkeypatch):
    import importlib

    def failing_plan(*args, **kwargs):
        raise ValueError("no config here\nmore")

    _out_of_memory_at(monkeypatch, 1)
    monkeypatch.setattr(
        importlib.import_module("ladder_kernels.planning.planner"), "plan", failing_plan
    )  # the module, not the package's plan()
    with pytest.raises(TrainingError) as failed:
        TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "oom", method="xladder", ladder_storage="int8")).run()
    message = str(failed.value)
    assert message.startswith("out of memory at step 1 of 6") and "\n" not in message
    assert "--ladder-storage" not in message and "--reduction-factor 2" in message  # int8 is on already
    assert message.endswith("`ladder-kernels plan` could not predict this run (ValueError: no config here)")


# --- killed for real: SIGKILL between checkpoints and during a checkpoint write ------------------------------

# `python -m ladder_kernels finetune ...` with a pause where the test kills it (the marker file says it is there).
_PAUSED_FINETUNE = r"""
import os, sys, time
import ladder_kernels.train.run as finetune
from ladder_kernels.cli import main

moment, marker = sys.argv[1], sys.argv[2]

def pause(where):
    open(marker, "w").write(where)
    time.sleep(300)

if moment == "between":  # after step 3: step 2 is checkpointed, step 3 is not
    run = finetune.TrainingRun.run
    finetune.TrainingRun.run = lambda self, on_step=None: run(self, on_step=lambda step: step == 3 and pause("step 3"))
else:  # the step-4 checkpoint: half of it in the temporary file, not yet renamed to checkpoint.pt
    replace, writes = os.replace, []

    def paused_replace(src, dst):
        if os.path.basename(dst) == "checkpoint.pt":
            writes.append(dst)
            if len(writes) == 2:
                os.truncate(src, os.path.getsize(src) // 2)
                pause("writing the step-4 checkpoint")
        replace(src, dst)

    os.replace = paused_replace
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, keyword_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    TrainingRun(_cfg(tiny_model, keyword_data, out)).run()
    return load_file(out / ADAPTER / "ladder_model.safetensors")


@pytest.mark.parametrize("moment", ["between", "during"])
def test_a_killed_process_resumes_to_the_same_weights(moment, uninterrupted, tiny_model, keyword_data, tmp_path):
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from ladder_kernels.cli import main

    out, marker = tmp_path / "run", tmp_path / "paused"
    args = shlex.split(_cfg(tiny_model, keyword_data, out).command_line())[1:]  # finetune --model ... --output-dir out
    repo = REPO
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}  # one thread, as in this process
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PAUSED_FINETUNE, moment, str(marker), *args],
            cwd=repo,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert marker.exists(), (tmp_path / "log").read_text()[-3000:]
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    leftovers = list(out.glob(".tmp-*checkpoint.pt"))
    assert load_checkpoint(out / CHECKPOINT)["step"] == 2  # the last complete checkpoint
    if moment == "during":  # the half-written step-4 checkpoint stayed a temporary file
        assert len(leftovers) == 1 and leftovers[0].stat().st_size < (out / CHECKPOINT).stat().st_size
    assert not (out / ADAPTER).exists()

    assert main(["finetune", "--resume", "--output-dir", str(out)]) == 0
    resumed = load_file(out / ADAPTER / "ladder_model.safetensors")
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert json.loads((out / SUMMARY_JSON).read_text())["resumed_from_step"] == 2
    assert not list(out.glob(".tmp-*"))  # the leftover was removed, never read


def test_batch_size_must_cover_every_process(tiny_model, keyword_data, tmp_path, monkeypatch):
    import ladder_kernels.train.run as finetune

    monkeypatch.setattr(finetune, "rank_and_world", lambda: (0, 4))  # as under torchrun --nproc_per_node 4
    with pytest.raises(ConfigError, match=r"--batch-size 2 is split across 4 processes: it must be at least 4"):
        TrainingRun(_cfg(tiny_model, keyword_data, tmp_path / "x", batch_size=2))
    assert not (tmp_path / "x").exists()
