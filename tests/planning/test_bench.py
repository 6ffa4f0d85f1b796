"""The end-to-end bench's timing protocol (methods interleaved within each round, first method rotating, warm-up
untimed, median/min/max) and its report (ratios to qlora, agreement between two runs), on stub trainers."""

from __future__ import annotations

import shlex
import sys

import torch

from ladder_kernels.planning import bench
from ladder_kernels.planning.bench import BenchSettings, measure_methods
from ladder_kernels.planning.bench_report import agreement, agreement_markdown, markdown_table


class StubTrainer:
    calls: list[str] = []

    def __init__(self, method, source, dtype, device):
        self.method = method
        self.model = torch.nn.Linear(2, 2)
        self.optimizer = torch.optim.AdamW(self.model.parameters())

    def step(self, ids):
        StubTrainer.calls.append(self.method)
        return torch.tensor(float(len(StubTrainer.calls)))


def test_methods_take_turns_with_a_rotating_first_method(monkeypatch):
    monkeypatch.setattr(bench, "MethodTrainer", StubTrainer)
    StubTrainer.calls = []
    settings = BenchSettings(methods=("ladder", "xladder", "qlora"), models=("tiny-llama",), steps=4, warmup=2)
    assert settings.interleave  # on CPU by default
    results = measure_methods(None, settings.methods, torch.zeros(1, 8, dtype=torch.long), settings)
    rounds = [StubTrainer.calls[i : i + 3] for i in range(0, 18, 3)]
    assert rounds == [
        ["ladder", "xladder", "qlora"],
        ["xladder", "qlora", "ladder"],
        ["qlora", "ladder", "xladder"],
        ["ladder", "xladder", "qlora"],
        ["xladder", "qlora", "ladder"],
        ["qlora", "ladder", "xladder"],
    ]
    assert len(StubTrainer.calls) == 18 + 3  # then one more step each, under the memory tracker
    for m in settings.methods:
        r = results[m]
        assert r["timed_steps"] == 4 and r["interleaved"] == 1 and r["oom"] == 0
        assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
        assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
        assert r["loss_first"] == 1 + settings.methods.index(m)  # the first round's loss, warm-up included
        assert r["speed_vs_qlora"] > 0
    assert results["qlora"]["speed_vs_qlora"] == 1.0


def _rows(speeds: dict[str, float], stamp: str = "t0") -> list[dict]:
    base = dict(model="m", batch=1, seq_len=64, device="cpu", versions="v", timestamp=stamp, command="c")
    return [
        dict(base, method=m, metric=k, value=v)
        for m, s in speeds.items()
        for k, v in (("tokens_per_s", s), ("tokens_per_s_min", s / 2), ("tokens_per_s_max", s * 2), ("timed_steps", 10))
    ]


def test_table_shows_median_spread_and_ratio_to_qlora():
    table = markdown_table(_rows({"ladder": 300.0, "qlora": 100.0}))
    assert "| m | 1 | 64 | ladder | - | - | - | 300 (150–600) | 3.00 | - |" in table
    assert "median over 10 timed steps" in table


def test_agreement_between_two_runs():
    now, before = _rows({"ladder": 300.0, "qlora": 100.0}), _rows({"ladder": 200.0, "qlora": 80.0}, "t1")
    (pair,) = agreement(now, before)  # qlora itself is the reference, not compared
    assert pair["method"] == "ladder" and pair["ratio"] == 3.0 and pair["earlier"] == 2.5
    assert abs(pair["difference"] - 0.2) < 1e-12
    assert "within 20%" in agreement_markdown(now, before, "run1.csv")
    assert "NOT within 10%" in agreement_markdown(now, before, "run1.csv", tolerance=0.1)


def test_command_line_quotes_its_arguments_and_records_the_thread_switches(monkeypatch):
    """The recorded command reruns as it ran: an empty argument stays '' (it used to vanish, shifting the next
    option into its place) and the thread settings that set every timing are in front."""
    monkeypatch.setattr(sys, "argv", ["ladder-kernels", "bench", "--equal-time-format", "", "--tag", "a b"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    command = bench.command_line()
    assert command.startswith("OMP_NUM_THREADS=1 ")
    assert shlex.split(command)[-5:] == ["bench", "--equal-time-format", "", "--tag", "a b"]
