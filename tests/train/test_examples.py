"""The runnable scripts in python/, each on a tiny local checkpoint."""

from __future__ import annotations

import importlib.util
import json

import pytest
from safetensors.torch import load_file

from ladder_kernels.train.config import FinetuneConfig
from ladder_kernels.train.run import TrainingRun
from tests.helpers import REPO

SCRIPTS = REPO / "python"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    labels = ("negative", "neutral", "positive")
    path.write_text(
        "".join(json.dumps({"text": f"tweet number {i}", "label": labels[i % 3]}) + "\n" for i in range(60)),
        encoding="utf-8",
    )
    return path


def _common(tiny_model, data_file, out) -> list[str]:
    return [
        "--model",
        str(tiny_model),
        "--data",
        str(data_file),
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--reduction-factor",
        "2",
        "--dtype",
        "float32",
        "--output-dir",
        str(out),
    ]


def test_hf_trainer_checkpoints_only_the_side_network_and_resumes(tiny_model, data_file, tmp_path, capsys):
    script = load_script("hf_trainer")
    out = tmp_path / "hf"
    assert script.main(_common(tiny_model, data_file, out) + ["--steps", "2", "--save-steps", "2"]) == 0
    saved = load_file(out / "checkpoint-2" / "model.safetensors")
    assert saved and all(k.startswith("side.") for k in saved)  # no backbone weights in a checkpoint
    assert script.main(_common(tiny_model, data_file, out) + ["--steps", "4", "--save-steps", "2", "--resume"]) == 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    logged_steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert logged_steps[:2] == [1, 2] and logged_steps[-1] == 4  # steps 1-2 come from the resumed checkpoint's history
    assert "trained 4 steps" in capsys.readouterr().out
    assert (out / "adapter" / "ladder_model.safetensors").is_file()


def test_trl_script_without_trl_says_it_is_an_optional_extra(tmp_path, capsys):
    if importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None:
        pytest.skip("TRL is installed: the missing-extra message does not apply")
    script = load_script("trl_sft")
    assert script.main(["--output-dir", str(tmp_path / "trl")]) == 2
    assert "optional extra: pip install trl" in capsys.readouterr().err
    assert not (tmp_path / "trl").exists()


def test_trl_sft_trains_a_ladder_model(tiny_model, data_file, tmp_path):
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        pytest.skip("TRL (and datasets) is an optional extra and is not installed here: pip install trl")
    script = load_script("trl_sft")
    out = tmp_path / "trl"
    assert script.main(_common(tiny_model, data_file, out) + ["--steps", "2"]) == 0
    assert (out / "adapter" / "ladder_model.safetensors").is_file()


def test_generate_script_prints_completion_and_label_probabilities(tiny_model, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    TrainingRun(
        FinetuneConfig(
            model=str(tiny_model),
            data=str(data_file),
            seq_len=32,
            batch_size=4,
            steps=2,
            eval_samples=3,
            reduction_factor=2,
            dtype="float32",
            output_dir=str(out),
        )
    ).run()
    capsys.readouterr()
    assert load_script("generate").main(["--adapter", str(out), "--tweet", "a tweet", "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "Tweet: a tweet"
    probs = dict(part.split() for part in lines[-1].removeprefix("label probabilities: ").split(", "))
    assert set(probs) == {"negative", "neutral", "positive"} and abs(sum(map(float, probs.values())) - 1) < 0.02


def test_plan_memory_script_says_what_fits(tiny_model, capsys):
    import ladder_kernels as lk

    ladder, qlora = (lk.plan(str(tiny_model), m, seq_len=64) for m in ("ladder", "qlora"))
    assert ladder.required_bytes < qlora.required_bytes
    between = (ladder.required_bytes + qlora.required_bytes) // 2  # fits Ladder, not QLoRA
    argv = ["--model", str(tiny_model), "--seq-len", "64", "--gpu-memory", str(between), "--no-max-context"]
    assert load_script("plan_memory").main(argv) == 0
    out = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if "peak" in line}
    assert "-> fits" in lines["ladder"] and "does NOT fit" in lines["qlora"]
    assert f"peak {ladder.peak_gib:6.2f} GiB" in lines["ladder"]
