import json

import pytest
import torch

from ladder_kernels.defaults import DEFAULT_LADDER_EVERY
from ladder_kernels.nn.config import every_nth_layer
from ladder_kernels.planning.planner import (
    BREAKDOWN_KEYS,
    CUDA_CONTEXT_BYTES,
    MemoryPlan,
    TrackedTraining,
    _longest_fitting,
    load_config,
    max_seq_len,
    plan,
    required_bytes,
    shipped_models,
)
from ladder_kernels.units import parse_bytes
from tests.helpers import tiny_config

SEQ = 64


def _cfg(family="llama"):
    # distinct sizes so that only logits are [..., vocab]; multiples of bitsandbytes' blocksize (64)
    return tiny_config(family, num_layers=2, hidden_size=128, intermediate_size=256, vocab_size=1000)


def _measured_peak(cfg, method: str) -> int:
    """Peak tracked tensor memory of two real training steps on this CPU (real weights, real kernels)."""
    torch.manual_seed(0)
    with TrackedTraining(cfg, method, torch.bfloat16, fake=False) as run:
        peak, _ = run.peak_of_steps(SEQ, 1, 2)
        assert torch.isfinite(run.last_loss)
    return peak


@pytest.mark.parametrize(
    "family,method",
    [
        ("llama", "ladder"),
        ("llama", "xladder"),
        ("llama", "qlora"),
        ("llama", "qlora-ckpt"),
        ("qwen2", "ladder"),
        ("qwen2", "qlora"),  # q/k/v biases, tied embeddings
    ],
)
def test_plan_within_1_percent_of_measured_cpu_peak(family, method):
    cfg = _cfg(family)
    estimate = plan(cfg, method, seq_len=SEQ)
    measured = _measured_peak(cfg, method)
    # Measured (2 runs each): planned/measured - 1 = +0.16..0.21% for ladder, xladder and qwen2 ladder (about
    # 1.9 kB of 0.9-1.2 MB, the same every run), 0 to +0.03% for qlora and qlora-ckpt (the fake plan varies by
    # ~1 kB between runs). Deterministic to well under 1%, so 1% leaves 5x margin and still catches a missed
    # tensor class: planning one step (no AdamW state yet) is off by 7.7-22% here, and its 8.8% (ladder) and
    # 7.7% (xladder) passed the former 10% bound.
    assert abs(estimate.peak_bytes / measured - 1) < 0.01, (estimate.peak_bytes, measured)
    assert sum(estimate.breakdown.values()) == estimate.peak_bytes
    assert set(estimate.breakdown) == set(BREAKDOWN_KEYS)


def test_breakdown_matches_the_memory_arithmetic():
    cfg = _cfg()
    qlora = plan(cfg, "qlora", seq_len=SEQ)
    n_linear = cfg.num_hidden_layers * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128)  # q, o; k, v (2 of 4 heads); MLP
    n_embed = 2 * cfg.vocab_size * 128  # embeddings + LM head, untied
    lora = cfg.num_hidden_layers * 16 * (2 * (128 + 128) + 2 * (128 + 64) + 2 * (128 + 256) + (256 + 128))
    # 4 bits per weight + 1 byte of absmax per 64; 16-bit embeddings; fp32 LoRA
    expected_weights = n_linear / 2 + n_linear / 64 + 2 * n_embed + 4 * lora
    assert qlora.breakdown["weights"] == pytest.approx(expected_weights, rel=0.03)
    assert qlora.breakdown["optimizer_state"] == pytest.approx(2 * 4 * lora, rel=0.01)  # AdamW: 2 fp32 moments
    # full logits in training: at least the fp32 [T, vocab] kept for the cross-entropy backward
    assert qlora.breakdown["logits_loss"] >= SEQ * cfg.vocab_size * 4
    ladder = plan(cfg, "ladder", seq_len=SEQ)
    assert ladder.breakdown["logits_loss"] == 0  # fused cross-entropy: no [T, vocab] tensor outlives a chunk
    assert ladder.peak_bytes < qlora.peak_bytes


def test_fits_and_max_seq_len_agree():
    cfg = _cfg()
    at_256 = plan(cfg, "qlora", seq_len=256)
    budget = at_256.required_bytes
    assert at_256.fits(budget) and not at_256.fits(budget - 1)
    assert at_256.required_bytes == int(at_256.peak_bytes * 1.05) + CUDA_CONTEXT_BYTES
    longest = max_seq_len(cfg, budget, "qlora", granularity=64, limit=1024)
    assert 256 <= longest < 1024
    assert plan(cfg, "qlora", seq_len=longest).fits(budget)
    assert not plan(cfg, "qlora", seq_len=longest + 64).fits(budget)
    assert max_seq_len(cfg, CUDA_CONTEXT_BYTES, "qlora", granularity=64, limit=1024) == 0


@pytest.mark.parametrize(
    "peaks",
    [
        lambda k: 10**9 + 3 * 10**7 * k,  # linear, as sequence length scaling mostly is
        lambda k: 10**9 + 10**6 * k + 2 * 10**6 * k * k,  # quadratic (eager attention)
        lambda k: 10**9 if k < 77 else 10**12,  # a cliff
        lambda k: 10**12,  # never fits
    ],
)
def test_longest_fitting_equals_exhaustive_search(peaks):
    gpu = 12 * 2**30
    calls = []
    found = _longest_fitting(lambda k: calls.append(k) or peaks(k), gpu, 256, {8: peaks(8)})
    exhaustive = max([k for k in range(257) if required_bytes(peaks(k)) <= gpu], default=0)
    assert found == exhaustive
    assert len(calls) <= 12  # far fewer steps than a scan


def test_shipped_configs():
    assert set(shipped_models()) >= {"llama-2-7b", "llama-2-13b", "llama-3-8b", "mistral-7b", "qwen2.5-7b"}
    expected = {  # name: (model_type, hidden, layers, heads, kv heads, intermediate, vocab)
        "llama-2-7b": ("llama", 4096, 32, 32, 32, 11008, 32000),
        "llama-2-13b": ("llama", 5120, 40, 40, 40, 13824, 32000),
        "llama-3-8b": ("llama", 4096, 32, 32, 8, 14336, 128256),
        "mistral-7b": ("mistral", 4096, 32, 32, 8, 14336, 32000),
        "qwen2.5-7b": ("qwen2", 3584, 28, 28, 4, 18944, 152064),
    }
    for name, fields in expected.items():
        c = load_config(name)
        assert (
            c.model_type,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
            c.vocab_size,
        ) == fields


def test_config_from_a_json_file_and_bad_inputs(tmp_path):
    path = tmp_path / "config.json"
    _cfg().to_json_file(path)
    assert load_config(path).hidden_size == 128
    assert load_config(tmp_path).hidden_size == 128  # a checkpoint folder
    with pytest.raises(ValueError, match="neither a shipped model"):
        load_config("llama-9-70b")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="no model_type"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="method must be one of"):
        plan(_cfg(), "lora")
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        plan(_cfg(), "ladder", seq_len=0)
    with pytest.raises(ValueError, match="dtype must be"):
        plan(_cfg(), "ladder", dtype=torch.int8)


def test_parse_bytes():
    assert parse_bytes("12GB") == parse_bytes("12 GiB") == parse_bytes("12g") == 12 * 2**30
    assert parse_bytes("24000MiB") == 24000 * 2**20
    assert parse_bytes(1234) == 1234
    for bad in ("twelve", "12 parsecs", ""):
        with pytest.raises(ValueError, match="gpu memory must look like"):
            parse_bytes(bad)


def test_cli_prints_a_table_and_json(tmp_path, capsys):
    from ladder_kernels.cli import main

    path = tmp_path / "config.json"
    _cfg().to_json_file(path)
    args = ["plan", "--model", str(path), "--seq-len", "64", "--gpu-memory", "1GB", "--methods", "ladder,qlora"]
    assert main(args + ["--no-max-context"]) == 0
    table = capsys.readouterr().out
    rows = [line.split() for line in table.splitlines() if line.startswith(("ladder", "qlora"))]
    assert [r[0] for r in rows] == ["ladder", "qlora"] and all(r[3] == "yes" for r in rows)
    assert main(args[:-1] + ["ladder", "--json"]) == 0  # with the longest-context search
    plans = json.loads(capsys.readouterr().out)
    assert [p["method"] for p in plans] == ["ladder"]
    assert plans[0]["fits"] and plans[0]["max_seq_len"] >= 64 and plans[0]["breakdown"]["weights"] > 0
    assert main(["plan", "--model", str(path), "--methods", "ladder,lora"]) == 2
    assert "--methods" in capsys.readouterr().err


@pytest.mark.slow
def test_llama2_7b_done_when():
    """Issue 4: Llama-2-7B at 2048 tokens fits 12 GB with Ladder, not with QLoRA without checkpointing."""
    assert plan("llama-2-7b", "ladder", seq_len=2048).fits("12GB")
    assert not plan("llama-2-7b", "qlora", seq_len=2048).fits("12GB")
    # the goal: 4x the paper's 2k context in 12 GB, with finetune's default side network (a block every 3rd layer)
    every_third = every_nth_layer(32, DEFAULT_LADDER_EVERY)
    assert max_seq_len("llama-2-7b", "12GB", "ladder", granularity=1024, ladder_layers=every_third) >= 8192


@pytest.mark.slow
def test_plan_within_1_percent_on_smollm2():
    from ladder_kernels.train.backbones import resolve_model

    model_dir = resolve_model("embedded")
    for method in ("ladder", "qlora"):
        estimate = plan(model_dir, method, seq_len=SEQ)
        torch.manual_seed(0)
        with TrackedTraining(model_dir, method, torch.bfloat16, fake=False) as run:
            measured, _ = run.peak_of_steps(SEQ, 1, 2)
        # measured: +0.0054% (ladder, 163.9 MB) and +0.0004% (qlora, 287.7 MB)
        assert abs(estimate.peak_bytes / measured - 1) < 0.01, (method, estimate.peak_bytes, measured)


def test_memory_plan_is_a_value():
    p = MemoryPlan("ladder", "m", 8, 1, torch.bfloat16, 100, dict.fromkeys(BREAKDOWN_KEYS, 20))
    assert p.to_dict()["dtype"] == "bfloat16" and p.peak_gib == 100 / 2**30


def test_cli_ladder_every_defaults_to_finetunes_and_changes_the_plan(tmp_path, capsys):
    from ladder_kernels.cli import main
    from ladder_kernels.defaults import DEFAULT_LADDER_EVERY
    from ladder_kernels.nn.config import every_nth_layer

    path = tmp_path / "config.json"
    tiny_config("llama", num_layers=6, hidden_size=128, intermediate_size=256, vocab_size=1000).to_json_file(path)
    base = ["plan", "--model", str(path), "--seq-len", "64", "--methods", "ladder", "--no-max-context", "--json"]
    plans = {}
    for every in (None, 1, 2):
        assert main(base + ([] if every is None else ["--ladder-every", str(every)])) == 0
        plans[every] = json.loads(capsys.readouterr().out)[0]
    assert plans[None]["ladder_options"]["ladder_layers"] == every_nth_layer(6, DEFAULT_LADDER_EVERY) == [2, 5]
    assert "ladder_layers" not in plans[1]["ladder_options"] and plans[2]["ladder_options"]["ladder_layers"] == [
        1,
        3,
        5,
    ]
    assert plans[None]["peak_bytes"] < plans[2]["peak_bytes"] < plans[1]["peak_bytes"]  # fewer side blocks, less memory
    assert main(base + ["--ladder-every", "0"]) == 2 and "--ladder-every" in capsys.readouterr().err
