"""Training FLOPs, counted analytically from the model's config and the tokens of each forward call (`bench
--accuracy` plots accuracy and loss against them).

What is counted: every matrix multiply, at 2 FLOPs per multiply-add, over the tokens the model computes on (the
padded [batch, width] of each micro-batch, as the kernels run it):
- backbone forward: its linears (q, k, v, o and the gated MLP's three, per layer) on every token, plus attention's
  two products (q·kᵀ and p·v) over the full [width x width] square per head (what a masked SDPA computes; a causal
  kernel skips about half of it, a sliding window more);
- Ladder / xLadder: the backbone forward (none for steps trained from the backbone-state cache: with --epochs E the
  caching pass counts once per example, then every step trains from the cache), then the side network forward and
  backward, from its shapes (nn/side.py `side_shape`, `side_wiring`): the branch and ladder down-projections on
  every token, forward + weight gradient (2x; their input is the no-grad backbone's); the side blocks' linears and
  attention, forward + input and weight gradients (3x); up_proj and the frozen lm_head on the tokens with a loss
  only (LadderModel.forward selects them before the output mix), up_proj 3x, lm_head forward + input gradient
  (2x: the fused linear cross-entropy, no weight gradient);
- QLoRA: the backbone forward with lm_head on every token (transformers computes all logits), then the backward
  through the whole backbone: the input gradient of every frozen linear and of lm_head (1x each, no weight
  gradient), attention's backward (2x its forward), plus the LoRA adapters (rank LORA_R on every linear but
  lm_head) forward, input and weight gradients (3x).

Not counted: norms, rotary embeddings, activations, softmax, gates, the output mix, the optimizer, biases and the
embedding lookup (all linear in the tokens and at most a few percent at these shapes), NF4 dequantization, and
evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ladder_kernels.defaults import FINETUNE_METHODS, LORA_R
from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.side import side_shape, side_wiring


@dataclass(frozen=True)
class ModelShape:
    """The backbone sizes the count needs (and the fields nn/side.py `side_shape` reads), from a transformers
    config by `ModelShape.of`."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    activation: str = "silu"
    qkv_bias: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            _check_count(f"ModelShape.{name}", getattr(self, name), 1)
        _check_count("ModelShape.vocab_size", self.vocab_size, 1)

    @classmethod
    def of(cls, config) -> "ModelShape":
        """From a transformers PretrainedConfig (a text config inside a multimodal one is used as it is)."""
        heads = getattr(config, "num_attention_heads", None)
        missing = [
            n
            for n in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if getattr(config, n, None) is None
        ]
        if missing:
            raise ValueError(f"flops: config lacks {', '.join(missing)} (a decoder-only causal LM config is needed)")
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            activation=getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "silu",
        )


@dataclass(frozen=True)
class Batch:
    """One forward call: `sequences` examples padded to `width` tokens, `loss_tokens` of them with a loss."""

    sequences: int
    width: int
    loss_tokens: int

    def __post_init__(self) -> None:
        _check_count("Batch.sequences", self.sequences, 1)
        _check_count("Batch.width", self.width, 1)
        _check_count("Batch.loss_tokens", self.loss_tokens, 0)
        if self.loss_tokens > self.tokens:
            raise ValueError(f"Batch.loss_tokens {self.loss_tokens} exceeds the batch's {self.tokens} tokens")

    @property
    def tokens(self) -> int:
        return self.sequences * self.width


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"flops: {name} must be an integer >= {minimum}, got {value!r}")


def _attention(heads: int, head_dim: int, layers: int, batch: Batch) -> int:
    """q·kᵀ and p·v over the full square, per head and layer."""
    return 4 * layers * heads * head_dim * batch.width * batch.width * batch.sequences


def _layer_linear_params(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> int:
    return hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate


def backbone_forward_flops(shape: ModelShape, batch: Batch, lm_head_tokens: int = 0) -> int:
    """The backbone's decoder layers on every token of `batch`, plus lm_head on `lm_head_tokens` of them."""
    _check_count("lm_head_tokens", lm_head_tokens, 0)
    linear = _layer_linear_params(
        shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.intermediate_size
    )
    return (
        2 * shape.num_layers * linear * batch.tokens
        + _attention(shape.num_heads, shape.head_dim, shape.num_layers, batch)
        + 2 * shape.hidden_size * shape.vocab_size * lm_head_tokens
    )


def side_training_flops(shape: ModelShape, ladder: LadderConfig, batch: Batch) -> dict[str, int]:
    """The side network's forward and backward on `batch`, by part: projections (2x), blocks (3x), up_proj (3x,
    loss tokens), lm_head (2x, loss tokens)."""
    if not isinstance(ladder, LadderConfig):
        raise ValueError(f"flops: ladder must be a LadderConfig, got {type(ladder).__name__}")
    side = side_shape(shape, ladder)
    _, sources, free = side_wiring(shape.num_layers, ladder)
    blocks = len(sources) + free
    D, d = shape.hidden_size, side.width
    linear = _layer_linear_params(d, side.num_heads, side.num_kv_heads, side.head_dim, side.intermediate_size)
    block_forward = 2 * blocks * linear * batch.tokens + _attention(side.num_heads, side.head_dim, blocks, batch)
    return {
        "projections": 2 * (2 * D * d * (1 + len(sources)) * batch.tokens),
        "blocks": 3 * block_forward,
        "up_proj": 3 * (2 * d * D * batch.loss_tokens),
        "lm_head": 2 * (2 * D * shape.vocab_size * batch.loss_tokens),
    }


def qlora_training_flops(shape: ModelShape, batch: Batch, lora_r: int = LORA_R) -> dict[str, int]:
    """QLoRA's forward and backward on `batch`, by part: backbone (forward + input gradients), lora (3x)."""
    _check_count("lora_r", lora_r, 1)
    D, inter, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    attention = _attention(shape.num_heads, hd, shape.num_layers, batch)
    linear_fwd = backbone_forward_flops(shape, batch) - attention
    lm_head = 2 * D * shape.vocab_size * batch.tokens
    # (in + out) of each adapted linear: q, k, v, o, gate, up, down
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    in_plus_out = (D + q) * 2 + 2 * (D + kv) + 3 * (D + inter)
    return {
        "backbone": 2 * linear_fwd + 3 * attention + 2 * lm_head,
        "lora": 3 * (2 * lora_r * in_plus_out * shape.num_layers * batch.tokens),
    }


def step_flops(
    shape: ModelShape,
    method: str,
    batches: Sequence[Batch],
    ladder: Optional[LadderConfig] = None,
    from_cache: bool = False,
    lora_r: int = LORA_R,
) -> int:
    """Training FLOPs of one optimizer step over `batches` (its micro-batches). Ladder / xLadder need `ladder` (the
    run's LadderConfig); `from_cache`: the backbone's outputs come from the state cache (no backbone forward)."""
    _check_method(method, ladder)
    if not batches:
        raise ValueError("flops: batches must hold at least one micro-batch")
    if method == "qlora":
        if from_cache:
            raise ValueError("flops: from_cache applies to ladder and xladder (QLoRA runs its backbone every step)")
        return sum(sum(qlora_training_flops(shape, b, lora_r).values()) for b in batches)
    backbone = 0 if from_cache else sum(backbone_forward_flops(shape, b) for b in batches)
    return backbone + sum(sum(side_training_flops(shape, ladder, b).values()) for b in batches)


def run_flops(
    shape: ModelShape,
    method: str,
    epoch: Sequence[Sequence[Batch]],
    epochs: int = 1,
    ladder: Optional[LadderConfig] = None,
    lora_r: int = LORA_R,
) -> int:
    """Training FLOPs of a run: `epoch` lists each optimizer step's micro-batches of one epoch. With `epochs` > 1
    (Ladder / xLadder with the backbone-state cache) the backbone runs once per example (the caching pass) and
    every step of every epoch trains from the cache; later epochs reshuffle the same examples, counted here with
    epoch 1's batch widths."""
    _check_count("epochs", epochs, 1)
    _check_method(method, ladder)
    if not epoch:
        raise ValueError("flops: epoch must hold at least one optimizer step")
    if epochs == 1:
        return sum(step_flops(shape, method, step, ladder, lora_r=lora_r) for step in epoch)
    if method == "qlora":
        raise ValueError("flops: epochs > 1 applies to ladder and xladder (QLoRA has no backbone-state cache)")
    caching = sum(backbone_forward_flops(shape, b) for step in epoch for b in step)
    return caching + epochs * sum(step_flops(shape, method, step, ladder, from_cache=True) for step in epoch)


def _check_method(method: str, ladder: Optional[LadderConfig]) -> None:
    if method not in FINETUNE_METHODS:
        raise ValueError(f"flops: method must be one of {', '.join(FINETUNE_METHODS)}, got {method!r}")
    if method != "qlora" and ladder is None:
        raise ValueError(f"flops: method {method} needs ladder (the run's LadderConfig)")
