"""`finetune --gpu-memory`: settings chosen by the memory planner to fit a budget, in the documented order, never
changing an explicit option; `--plan-only` on a shipped 7B config; the budget recorded in a run's summary."""

from __future__ import annotations

import re
import shlex

import pytest
import torch

from ladder_kernels.errors import ConfigError, ModelError
from ladder_kernels.planning.planner import CUDA_CONTEXT_BYTES, load_config, plan
from ladder_kernels.train.budget import budget_bytes, fit_to_budget
from ladder_kernels.train.config import FinetuneConfig, ladder_config
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

SEQ = 256


@pytest.fixture(scope="module")
def config():
    # sizes distinct and multiples of 64 (bitsandbytes' blocksize); 3 layers: one side block (--ladder-every 3),
    # so the fitting stops after side checkpointing (each setting tried costs a fake model)
    return tiny_config("llama", num_layers=3, hidden_size=128, intermediate_size=256, vocab_size=512)


def _planned(config, cfg: FinetuneConfig):
    """The planner's own figure for a FinetuneConfig's setting."""
    lc = ladder_config(cfg, config.num_hidden_layers)
    options = {k: getattr(lc, k) for k in ("reduction_factor", "ladder_layers", "ladder_storage", "side_checkpointing")}
    return plan(config, cfg.method, cfg.seq_len, cfg.batch_size, cfg.torch_dtype, **options)


def _cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"seq_len": SEQ, "batch_size": 8, "dtype": "bfloat16", **kw})


@pytest.fixture(scope="module")
def one_sequence_needs(config):
    """What a micro-batch of one needs with the default settings and with int8 ladder storage."""
    bf16 = _planned(config, _cfg(batch_size=1)).required_bytes
    int8 = _planned(config, _cfg(batch_size=1, ladder_storage="int8")).required_bytes
    assert int8 < bf16
    return bf16, int8


def test_a_roomy_budget_changes_nothing(config):
    fit = fit_to_budget(_cfg(gpu_memory="12GB"), explicit=set(), config=config)
    assert fit.changed == {} and fit.cfg.batch_size == 8 and fit.cfg.grad_accum == 1
    assert fit.plan.fits(12 * 2**30) and "nothing (the settings as given fit)" in "\n".join(fit.lines())


def test_the_micro_batch_goes_first_keeping_the_examples_per_step(config, one_sequence_needs):
    bf16, _ = one_sequence_needs
    budget = bf16 + 1  # one sequence at a time fits with the default settings, not two
    fit = fit_to_budget(_cfg(gpu_memory=str(budget)), explicit=set(), config=config)
    assert (fit.cfg.batch_size, fit.cfg.grad_accum) == (1, 8) and fit.cfg.ladder_storage == "bf16"
    assert fit.plan.fits(budget) and fit.plan.peak_bytes == _planned(config, fit.cfg).peak_bytes


def test_int8_storage_comes_next_and_an_explicit_option_is_kept(config, one_sequence_needs):
    bf16, int8 = one_sequence_needs
    budget = (bf16 + int8) // 2  # micro-batch 1 needs int8 ladder storage (or something after it)
    fit = fit_to_budget(_cfg(gpu_memory=str(budget)), explicit=set(), config=config)
    assert fit.cfg.ladder_storage == "int8" and not fit.cfg.side_checkpointing and fit.cfg.batch_size == 1
    assert fit.changed["ladder_storage"] == ("bf16", "int8") and fit.plan.fits(budget)
    # --ladder-storage bf16 given: kept; the next setting in the order is used instead
    kept = fit_to_budget(_cfg(gpu_memory=str(budget)), explicit={"ladder_storage"}, config=config)
    assert kept.cfg.ladder_storage == "bf16" and kept.cfg.side_checkpointing and "ladder_storage" in kept.kept
    assert kept.plan.fits(budget) and kept.plan.peak_bytes == _planned(config, kept.cfg).peak_bytes


def test_nothing_fits_names_the_smallest_budget_that_would(config):
    with pytest.raises(ConfigError, match=r"no setting fits .* give --gpu-memory (\S+) or more") as info:
        fit_to_budget(_cfg(gpu_memory=str(CUDA_CONTEXT_BYTES + 2**20)), explicit=set(), config=config)
    suggested = re.search(r"give --gpu-memory (\S+) or more", str(info.value)).group(1)
    fit = fit_to_budget(_cfg(gpu_memory=suggested), explicit=set(), config=config)
    assert fit.plan.fits(suggested)  # (rounded up to a tenth of a GB, the suggestion may fit a larger micro-batch)


def test_auto_on_a_machine_without_cuda_asks_for_a_size(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device here; give a size such as --gpu-memory 12GB"):
        budget_bytes("auto")
    with pytest.raises(ConfigError, match="--gpu-memory must be a size"):
        FinetuneConfig(gpu_memory="twelve").validate()


def test_a_shipped_config_without_plan_only_is_a_clear_error(tmp_path, capsys):
    from ladder_kernels.cli import main

    assert main(["finetune", "--model", "llama-2-7b", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--model llama-2-7b is a shipped config without weights" in err and "--plan-only" in err
    with pytest.raises(ModelError, match="shipped config without weights"):
        from ladder_kernels.train.backbones import resolve_model

        resolve_model("llama-2-13b")


def test_plan_only_7b_at_4096_prints_a_setting_that_fits_12gb(capsys):
    """The issue's command: every setting it prints fits 12 GB by the planner's own figure."""
    from ladder_kernels.cli import build_parser, main
    from ladder_kernels.cli.finetune import given_options

    argv = ["finetune", "--model", "llama-2-7b", "--seq-len", "4096", "--gpu-memory", "12GB", "--plan-only"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    settings = re.search(r"^  settings: (.*)$", out, re.M).group(1)
    printed_peak = float(re.search(r"planned peak ([0-9.]+) GiB", out).group(1))
    args = build_parser().parse_args(argv[:-3] + shlex.split(settings))
    cfg = FinetuneConfig(**given_options(args))
    assert cfg.batch_size * cfg.grad_accum == FinetuneConfig.batch_size  # the examples per optimizer step kept
    p = _planned(load_config("llama-2-7b"), cfg)
    assert p.fits("12GB") and abs(p.peak_bytes / 2**30 - printed_peak) < 0.01, (settings, p.peak_bytes)


def test_finetune_records_the_budget_in_its_summary(tiny_model, tmp_path):
    import json

    from ladder_kernels.train.run import TrainingRun

    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"Q: {i} + 1?", "completion": str(i + 1)} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = FinetuneConfig(
        model=str(tiny_model),
        data=str(data),
        task="arith",
        seq_len=32,
        steps=2,
        eval_samples=2,
        dtype="float32",
        reduction_factor=2,
        gpu_memory="12GB",
        output_dir=str(tmp_path / "run"),
    )
    summary = TrainingRun(cfg, explicit={"model", "data", "task", "seq_len", "steps", "eval_samples"}).run()
    budget = summary["memory_budget"]
    assert budget["budget_bytes"] == 12 * 2**30 and 0 < budget["planned_peak_bytes"] < budget["planned_required_bytes"]
    assert budget["settings"].startswith("--batch-size 32 --grad-accum 1")
    assert "memory budget (--gpu-memory)" in (tmp_path / "run" / "summary.md").read_text()
