"""What LadderModel needs to know about a backbone, resolved once per model into a `BackboneSpec`: its decoder
layers, norms, LM head, sizes, rotary settings, activation, logit softcap and cache keyword, and how to read a
layer's weights densely (for the pruned side initialisation).

Any transformers decoder-only causal LM with model.model.layers, embed_tokens, norm and lm_head works as it is;
a family that names things differently gets an entry in SPEC_OVERRIDES (keyed by config.model_type, as
peft's target-module table is), which overrides the probed values.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor, nn

from ladder_kernels.nn.nf4_linear import NF4Linear, bnb_linear4bit_class
from ladder_kernels.quant.nf4 import dequantize_nf4

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The norm before a layer's MLP: Gemma's pre_feedforward_layernorm, else the usual post_attention_layernorm.
MLP_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm")
# model_type -> BackboneSpec fields that probing gets wrong for that family (none needed for the families tested:
# llama, qwen2, mistral, gemma, gemma2, gemma3_text).
SPEC_OVERRIDES: dict[str, dict] = {}


@dataclass
class DenseLayerWeights:
    """A backbone decoder layer's weights as dense float32 tensors ([out, in] like nn.Linear).

    attn_gain / mlp_gain: the per-channel gains of the norms before attention and before the MLP (so Gemma's
    (1 + w) and Llama's w are handled alike)."""

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    gate: Tensor
    up: Tensor
    down: Tensor
    attn_gain: Tensor
    mlp_gain: Tensor
    q_bias: Optional[Tensor] = None
    k_bias: Optional[Tensor] = None
    v_bias: Optional[Tensor] = None


@dataclass(frozen=True)
class BackboneSpec:
    """The backbone facts LadderModel uses, probed from the model and its config (see `BackboneSpec.of`)."""

    inner: nn.Module  # backbone.model: embeddings, decoder layers, final norm, rotary embedding
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    activation: str  # the gated MLP's activation, a transformers ACT2FN name
    qkv_bias: bool
    logit_softcap: Optional[float]  # Gemma-2's final_logit_softcapping, else None
    cache_kwarg: str  # the keyword the inner model's forward takes its KV cache by

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def of(cls, backbone: nn.Module) -> "BackboneSpec":
        """Probe `backbone` (a transformers causal LM), then apply SPEC_OVERRIDES for its model_type."""
        inner, layers, final_norm, lm_head = decoder_parts(backbone)
        cfg = backbone.config
        heads = cfg.num_attention_heads
        attn = getattr(layers[0], "self_attn", None)
        q_proj = getattr(attn, "q_proj", None)
        spec = cls(
            inner=inner,
            layers=layers,
            final_norm=final_norm,
            lm_head=lm_head,
            model_type=str(getattr(cfg, "model_type", "")),
            hidden_size=cfg.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            intermediate_size=cfg.intermediate_size,
            rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(cfg),
            activation=getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or "silu",
            qkv_bias=getattr(q_proj, "bias", None) is not None,
            logit_softcap=getattr(cfg, "final_logit_softcapping", None) or None,
            cache_kwarg="cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values",
        )
        return replace(spec, **SPEC_OVERRIDES.get(spec.model_type, {}))

    def attention_scaling(self, layer: int) -> float:
        """Layer `layer`'s attention score scale (head_dim^-0.5, or Gemma's query_pre_attn_scalar^-0.5)."""
        return float(getattr(self.layers[layer].self_attn, "scaling", self.head_dim**-0.5))

    def inv_freq(self) -> Tensor:
        """The backbone's rotary inverse frequencies [head_dim/2] (with any rope scaling it applies)."""
        return backbone_inv_freq(self.inner, self.head_dim, self.rope_theta)


def decoder_parts(backbone: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Module]:
    """(backbone.model, its decoder layers, its final norm, backbone.lm_head), or a ValueError naming what is
    missing."""
    what = type(backbone).__name__
    needed = (
        "a decoder-only causal LM exposing model.model.layers, model.model.embed_tokens, model.model.norm and "
        "model.lm_head"
    )
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"LadderModel: backbone must be a torch.nn.Module (a transformers causal LM), got {what}")
    inner = getattr(backbone, "model", None)
    missing = [
        name
        for name, ok in (
            ("model.model", inner is not None),
            ("model.model.layers", isinstance(getattr(inner, "layers", None), nn.ModuleList)),
            ("model.model.embed_tokens", getattr(inner, "embed_tokens", None) is not None),
            ("model.model.norm", getattr(inner, "norm", None) is not None),
            ("model.lm_head", getattr(getattr(backbone, "lm_head", None), "weight", None) is not None),
            ("model.config", getattr(backbone, "config", None) is not None),
        )
        if not ok
    ]
    if missing:
        raise ValueError(f"LadderModel: unsupported backbone {what}: missing {', '.join(missing)} (needs {needed})")
    if len(inner.layers) == 0:
        raise ValueError(f"LadderModel: backbone {what} has no decoder layers")
    return inner, inner.layers, inner.norm, backbone.lm_head


def dense_weight(linear: nn.Module) -> Tensor:
    """A linear layer's weight as a dense float32 tensor, whether plain, NF4Linear or bitsandbytes 4-bit."""
    if isinstance(linear, NF4Linear):
        return dequantize_nf4(linear.nf4_weight, torch.float32)
    linear4bit = bnb_linear4bit_class()
    if linear4bit is not None and isinstance(linear, linear4bit):
        return dequantize_nf4(NF4Linear.from_bnb(linear).nf4_weight, torch.float32)
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"side_init='pruned': cannot read a dense weight from {type(linear).__name__}")
    return weight.detach().float()


@torch.no_grad()
def norm_gain(norm: nn.Module, width: int, device: torch.device) -> Tensor:
    """The per-channel gain of an RMS-style norm, whatever its parametrization (w, 1 + w): norm(ones)."""
    dtype = next((p.dtype for p in norm.parameters()), torch.float32)
    return norm(torch.ones(1, width, device=device, dtype=dtype)).float().reshape(-1)


def dense_layer_weights(layer: nn.Module, width: int) -> DenseLayerWeights:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if (
        attn is None
        or mlp is None
        or not all(hasattr(attn, n) for n in ATTENTION_PROJECTIONS)
        or not all(hasattr(mlp, n) for n in MLP_PROJECTIONS)
    ):
        raise ValueError(
            f"side_init='pruned' needs decoder layers with self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj; "
            f"{type(layer).__name__} lacks them (use side_init='random')"
        )
    device = attn.q_proj.weight.device if hasattr(attn.q_proj, "weight") else attn.q_proj.packed.device
    mlp_norm = next(getattr(layer, name) for name in MLP_NORM_NAMES if getattr(layer, name, None) is not None)
    bias = lambda m: None if getattr(m, "bias", None) is None else m.bias.detach().float()  # noqa: E731
    return DenseLayerWeights(
        q=dense_weight(attn.q_proj),
        k=dense_weight(attn.k_proj),
        v=dense_weight(attn.v_proj),
        o=dense_weight(attn.o_proj),
        gate=dense_weight(mlp.gate_proj),
        up=dense_weight(mlp.up_proj),
        down=dense_weight(mlp.down_proj),
        attn_gain=norm_gain(layer.input_layernorm, width, device),
        mlp_gain=norm_gain(mlp_norm, width, device),
        q_bias=bias(attn.q_proj),
        k_bias=bias(attn.k_proj),
        v_bias=bias(attn.v_proj),
    )


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict):
        if "rope_theta" in params:
            return float(params["rope_theta"])
        for key in ("full_attention", *params):  # per-layer-type parameters (Gemma3)
            if isinstance(params.get(key), dict) and "rope_theta" in params[key]:
                return float(params[key]["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def backbone_inv_freq(inner: nn.Module, head_dim: int, theta: float) -> Tensor:
    """The backbone's rotary inverse frequencies [head_dim/2] (with any rope scaling it applies)."""
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None:
        buffers = dict(rotary.named_buffers())
        for name in ("inv_freq", "full_attention_inv_freq", *sorted(buffers)):
            buf = buffers.get(name)
            if (
                buf is not None
                and name.endswith("inv_freq")
                and "original" not in name
                and buf.numel() == head_dim // 2
            ):
                return buf.detach().float().cpu()
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
