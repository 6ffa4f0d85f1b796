"""The `ladder-kernels` command line: subcommands, a run through `main`, `generate`, and every bad-input case
(one-line error, exit code 2, no traceback, nothing written)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from ladder_kernels.cli import main
from ladder_kernels.train.run_dir import RUN_CONFIG, SUMMARY_JSON
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    labels = ("negative", "neutral", "positive")
    path.write_text(
        "".join(json.dumps({"text": f"tweet {i}", "label": labels[i % 3]}) + "\n" for i in range(30)), encoding="utf-8"
    )
    return path


def _tiny_args(tiny_model, data_file, out) -> list[str]:
    return [
        "finetune",
        "--model",
        str(tiny_model),
        "--data",
        str(data_file),
        "--steps",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--eval-samples",
        "3",
        "--reduction-factor",
        "2",
        "--dtype",
        "float32",
        "--output-dir",
        str(out),
    ]


@pytest.fixture(scope="module")
def cli_run(tiny_model, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    code = main(_tiny_args(tiny_model, data_file, out))
    return out, code


def test_help_lists_all_subcommands():
    proc = subprocess.run(
        [sys.executable, "-m", "ladder_kernels", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    listed = set(re.findall(r"^ {4}(\w+)\s", proc.stdout, flags=re.M))  # one help row per registered subcommand
    assert listed >= {"finetune", "generate", "evaluate", "plan", "bench"}, proc.stdout


def test_finetune_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["finetune", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--data",
        "--task",
        "--method",
        "--seq-len",
        "--batch-size",
        "--grad-accum",
        "--steps",
        "--lr",
        "--reduction-factor",
        "--xladder-depth",
        "--ladder-storage",
        "--eval-samples",
        "--output-dir",
        "--resume",
        "--seed",
        "--max-minutes",
        "--skip-nonfinite",
        "--no-skip-nonfinite",
    ):
        assert option in text


def test_finetune_through_main_prints_the_summary(cli_run, capsys):
    out, code = cli_run
    assert code == 0
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert summary["steps"] == 2 and summary["command"].startswith("ladder-kernels finetune")
    assert json.loads((out / RUN_CONFIG).read_text())["config"]["batch_size"] == 4


def test_generate_prints_prompt_and_completion(cli_run, capsys):
    out, _ = cli_run
    capsys.readouterr()
    assert (
        main(["generate", "--adapter", str(out), "--prompt", "great car", "--task-template", "--max-new-tokens", "3"])
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith("Tweet: great car\nSentiment (negative, neutral or positive):")
    assert len(printed.strip()) > len("Tweet: great car\nSentiment (negative, neutral or positive):")


@pytest.mark.parametrize("case", ["missing_adapter", "zero_samples", "other_labels"])
def test_evaluate_bad_input(capsys, cli_run, tmp_path, case):
    out, _ = cli_run
    if case == "missing_adapter":
        argv, needle = ["evaluate", "--adapter", str(tmp_path / "nope")], "--adapter: no such folder"
    elif case == "zero_samples":
        argv, needle = (
            ["evaluate", "--adapter", str(out), "--eval-samples", "0"],
            "--eval-samples must be an integer >= 1",
        )
    else:
        other = tmp_path / "yes_no.jsonl"
        other.write_text(
            "".join(json.dumps({"text": f"t {i}", "label": ("yes", "no")[i % 2]}) + "\n" for i in range(10)),
            encoding="utf-8",
        )
        argv, needle = (
            ["evaluate", "--adapter", str(out), "--data", str(other), "--json", str(tmp_path / "r.json")],
            "--data: its labels",
        )
    _expect_input_error(capsys, argv, needle)
    assert not (tmp_path / "r.json").exists()


def _expect_input_error(capsys, argv, needle):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith(f"ladder-kernels {argv[0]}: error: ") and needle in last, err
    assert "Traceback" not in err
    return last


def test_missing_data_file(capsys, tiny_model, tmp_path):
    argv = _tiny_args(tiny_model, tmp_path / "nope.jsonl", tmp_path / "out")
    _expect_input_error(capsys, argv, "no such file")
    assert not (tmp_path / "out").exists()


def test_malformed_row_reports_its_line(capsys, tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "a", "label": "positive"}\n{"text": "b", "label": "negative"}\n{"text": "c"\n', encoding="utf-8"
    )
    _expect_input_error(capsys, _tiny_args(tiny_model, bad, tmp_path / "out"), f"{bad}:3: not valid JSON")
    assert not (tmp_path / "out").exists()


def test_empty_dataset(capsys, tiny_model, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n", encoding="utf-8")
    _expect_input_error(capsys, _tiny_args(tiny_model, empty, tmp_path / "out"), "empty dataset")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["no_config", "encoder_decoder", "wrong_file", "missing"])
def test_unsupported_model(capsys, data_file, tmp_path, kind):
    model = tmp_path / "model"
    if kind == "no_config":
        model.mkdir()
        needle = "not a transformers checkpoint folder"
    elif kind == "encoder_decoder":
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}), encoding="utf-8")
        needle = "unsupported model type 't5'"
    elif kind == "wrong_file":
        model = tmp_path / "weights.bin"
        model.write_bytes(b"\0" * 16)
        needle = "expected a transformers checkpoint folder, a .gguf file"
    else:
        model = tmp_path / "absent"
        needle = "no such file or folder"
    _expect_input_error(capsys, _tiny_args(model, data_file, tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


def test_output_dir_with_another_run_is_left_alone(capsys, cli_run, tiny_model, data_file):
    out, _ = cli_run
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    _expect_input_error(capsys, _tiny_args(tiny_model, data_file, out), "already holds another run")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before


def test_resume_errors(capsys, cli_run, tmp_path):
    out, _ = cli_run
    _expect_input_error(capsys, ["finetune", "--resume"], "--resume needs --output-dir")
    _expect_input_error(capsys, ["finetune", "--resume", "--output-dir", str(tmp_path)], "holds no run to resume")
    _expect_input_error(capsys, ["finetune", "--resume", "--output-dir", str(out), "--lr", "0.5"], "--lr 0.5 differs")
    _expect_input_error(capsys, ["finetune", "--resume", "--output-dir", str(out)], "already finished")


def test_bad_option_values(capsys, tiny_model, data_file, tmp_path):
    _expect_input_error(
        capsys,
        _tiny_args(tiny_model, data_file, tmp_path / "o") + ["--seq-len", "2"],
        "--seq-len must be an integer >= 8",
    )
    _expect_input_error(capsys, ["generate", "--adapter", str(tmp_path), "--prompt", "x"], "holds no adapter")


def test_bad_input_in_a_real_process_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ladder_kernels",
            "finetune",
            "--data",
            str(tmp_path / "missing.csv"),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_recorded_command_reproduces_the_configuration(cli_run):
    import shlex

    from ladder_kernels.cli import build_parser
    from ladder_kernels.cli.finetune import given_options
    from ladder_kernels.train.config import FinetuneConfig
    from ladder_kernels.train.run_dir import saved_config

    out, _ = cli_run
    command = json.loads((out / SUMMARY_JSON).read_text())["command"]
    assert "--steps 2" in command
    given = FinetuneConfig(**given_options(build_parser().parse_args(shlex.split(command)[1:])))
    assert given.in_effect() == saved_config(out) and saved_config(out).epochs == given.epochs_in_effect


def test_generate_emits_just_a_label_for_a_classifier_by_default(cli_run, capsys, monkeypatch):
    import ladder_kernels.cli.generate as generate_cli

    asked = []
    real = generate_cli.greedy_complete
    monkeypatch.setattr(generate_cli, "greedy_complete", lambda m, t, ids, n: asked.append(n) or real(m, t, ids, n))
    out, _ = cli_run
    assert main(["generate", "--adapter", str(out), "--prompt", "meh", "--task-template"]) == 0
    assert main(["generate", "--adapter", str(out), "--prompt", "meh", "--max-new-tokens", "5"]) == 0
    assert asked == [1, 5]  # the tiny tokenizer's labels are one token each
