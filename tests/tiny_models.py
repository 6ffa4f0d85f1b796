"""Tiny random-weight decoder-only backbones of several families, built locally from configs (no downloads).

    from tiny_models import FAMILIES, tiny_backbone   # tests/ is on sys.path under pytest, like conftest
    model = tiny_backbone("gemma3", num_layers=4)

Each family keeps what makes it different: Qwen2's q/k/v biases, Mistral's sliding window, Gemma's embedding
scaling and (1 + w) norms, Gemma3's sandwich norms, q/k norms, mixed sliding/full layers and logit softcap.
"""
from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma3")


def tiny_config(family: str = "llama", num_layers: int = 2, hidden_size: int = 64, intermediate_size: int = 128,
                num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int = 96, **overrides):
    """A transformers config for a tiny model of `family` (head_dim = hidden_size // num_heads)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=256, initializer_range=0.05, pad_token_id=0, bos_token_id=1, eos_token_id=2,
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
        cfg = tf.Gemma3TextConfig(**common, head_dim=head_dim, sliding_window=4, layer_types=layer_types,
                                  query_pre_attn_scalar=head_dim, final_logit_softcapping=30.0)
    else:
        raise ValueError(f"tiny_config: family must be one of {FAMILIES}, got {family!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_backbone(family: str = "llama", num_layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0, **config_kwargs):
    """A tiny causal LM of `family` with random weights (deterministic per seed), in eval mode."""
    import transformers as tf

    classes = {
        "llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM,
        "gemma": tf.GemmaForCausalLM, "gemma3": tf.Gemma3ForCausalLM,
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
