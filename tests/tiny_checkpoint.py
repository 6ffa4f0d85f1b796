"""A tiny local transformers checkpoint folder (random Llama weights + a small byte-level BPE tokenizer trained
on the tasks' own text), for end-to-end tests of `finetune`, `generate` and the python/ examples.

    from tests.tiny_checkpoint import write_tiny_checkpoint
    model_dir = write_tiny_checkpoint(tmp_path / "tiny")
"""
from __future__ import annotations

import functools
from pathlib import Path

from tests.tiny_models import tiny_backbone

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny configs' pad / bos / eos ids


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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def write_tiny_checkpoint(folder: Path, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny Llama + tokenizer to `folder` (a transformers checkpoint folder) and return it."""
    tokenizer = tiny_tokenizer()
    model = tiny_backbone("llama", num_layers=num_layers, seed=seed, vocab_size=len(tokenizer))
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_gguf(path: Path, num_layers: int = 2, hidden: int = 64, intermediate: int = 128, heads: int = 4,
                    kv_heads: int = 2, seed: int = 0) -> Path:
    """A tiny Llama GGUF file (random fp32 tensors, the tiny BPE tokenizer in its metadata), as llama.cpp lays it out."""
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
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (intermediate, hidden)),
                            ("ffn_up", (intermediate, hidden)), ("ffn_down", (hidden, intermediate))):
            tensor(f"blk.{b}.{name}.weight", *shape)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    tensor("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
