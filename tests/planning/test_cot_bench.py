"""`bench --cot` end to end on a tiny checkpoint: every cell runs once, equal parameters hold, equal-time cells are
sized from the measured step times, and a rerun reads finished cells back instead of training again."""

from __future__ import annotations

import csv

import pytest

from ladder_kernels.defaults import MATCH_PARAMS_TOLERANCE
from ladder_kernels.errors import ConfigError
from ladder_kernels.planning import cot_bench
from ladder_kernels.planning.cot_bench import CotBenchSettings, run_cot_bench, time_cells, write_cot_results
from tests.helpers import bench_args, forbid_training, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cot_bench_on_a_tiny_model(tmp_path, monkeypatch):
    settings = CotBenchSettings(
        model=str(write_tiny_checkpoint(tmp_path / "model", num_layers=4)),  # 4 layers: xLadder δ=2 can match
        formats=("short", "none"),
        depths=(1, 2),
        seeds=(0, 1),
        steps=2,
        epochs=2,  # Ladder / xLadder: 1 batch, twice from the backbone-state cache
        level="easy",
        batch_size=4,
        seq_len=96,
        eval_samples=3,
        dtype="float32",
        out_dir=tmp_path / "results",
        runs_dir=tmp_path / "runs",
        tag="tiny",
        command="test",
    )
    rows = run_cot_bench(settings)
    steps_rows = [r for r in rows if r["budget"] == "steps"]
    assert len(steps_rows) == 2 * (2 * 3 + 1)  # formats x (seeds x (ladder + 2 depths) + qlora)
    time_rows = [r for r in rows if r["budget"] == "time"]
    assert {r["cot"] for r in time_rows} == {"none"} and len(time_rows) == 2 * 2 + 1
    assert [c.steps for c in time_cells(settings, steps_rows)] == [r["steps"] for r in time_rows]
    assert all(r["steps"] % 2 == 0 for r in time_rows if r["method"] != "qlora")
    for r in steps_rows:
        assert r["steps"] == 2 and r["n_eval"] == 3 and r["mean_generated_tokens"] > 0
        assert r["epochs"] == (1 if r["method"] == "qlora" else 2)
        if r["method"] == "xladder":
            ladder = next(x for x in steps_rows if x["method"] == "ladder" and x["cot"] == r["cot"])
            assert abs(r["trainable_parameters"] - ladder["trainable_parameters"]) <= (
                MATCH_PARAMS_TOLERANCE * ladder["trainable_parameters"]
            )
    paths = write_cot_results(rows, settings.out_dir, settings.tag, settings.command)
    table = list(csv.DictReader(paths[0].open()))
    assert len(table) == len(rows) and table[0]["command"] == "test"
    md = paths[1].read_text()
    assert "| steps | none | xladder δ=2 | 2 |" in md and "| time | none | qlora | 1 |" in md
    assert "Ladder and xLadder take steps / E batches E times (E = 2)" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    forbid_training(monkeypatch)
    assert run_cot_bench(settings) == rows  # read back from the run folders
    assert run_cot_bench(settings, train=False) == rows
    partial = CotBenchSettings(**{**settings.__dict__, "seeds": (0, 1, 7)})
    assert run_cot_bench(partial, train=False) == rows  # seed 7's cells were never run: skipped, not trained
    assert cot_bench.aggregate(rows)[0]["seeds"] in (1, 2)
    standard = CotBenchSettings(**{**settings.__dict__, "level": "standard"})
    with pytest.raises(
        ConfigError, match="holds a finished run with other settings: --arith-level 'easy' \\(this bench: 'standard'\\)"
    ):
        run_cot_bench(standard)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="formats must be from full, short, none"):
        CotBenchSettings(formats=("long",))
    with pytest.raises(ValueError, match="equal_time_format 'full' is not among the formats"):
        CotBenchSettings(formats=("none",), equal_time_format="full")
    with pytest.raises(ValueError, match="depths must be non-empty integers >= 1"):
        CotBenchSettings(depths=(0,))
    with pytest.raises(ValueError, match="level must be one of standard, easy, got 'hard'"):
        CotBenchSettings(level="hard")
    with pytest.raises(ValueError, match=r"steps \(10\) must be a multiple of epochs \(3\)"):
        CotBenchSettings(steps=10, epochs=3)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        CotBenchSettings(epochs=0)


def test_bench_cot_options_reach_the_settings():
    from ladder_kernels.cli.bench import cot_settings_from_args

    args = bench_args(
        "--cot --formats none,full --depths 2,6 --seeds 0,1,2 --train-steps 7 --eval-samples 5 --dtype fp32 "
        "--equal-time-format none --no-qlora --tag x --epochs 7 --arith-level easy".split()
    )
    s = cot_settings_from_args(args)
    assert (s.formats, s.depths, s.seeds, s.steps, s.eval_samples) == (("none", "full"), (2, 6), (0, 1, 2), 7, 5)
    assert (s.dtype, s.qlora, s.tag, s.equal_time_format) == ("float32", False, "x", "none")
    assert (s.epochs, s.level) == (7, "easy")
    assert cot_settings_from_args(bench_args(["--cot"])).epochs == CotBenchSettings.epochs
    with pytest.raises(ValueError, match="formats must be from"):
        cot_settings_from_args(bench_args(["--cot", "--formats", "long"]))
