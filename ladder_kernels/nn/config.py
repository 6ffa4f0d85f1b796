"""LadderConfig: how the side network is shaped, initialised and wired to the backbone (JSON round-trip)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ladder_kernels.defaults import (
    BackboneQuant,
    Backend,
    ComputeDType,
    Gate,
    LadderNorm,
    LadderStorage,
    OutputMix,
    SideInit,
    literal_fields,
)
from ladder_kernels.io import write_text_atomic


@dataclass
class LadderConfig:
    """Configuration of a LadderModel. Every field has a help string (`LadderConfig.help()` lists them)."""

    reduction_factor: int = field(default=8, metadata={"help": "r: the side network's width is hidden_size // r."})
    ladder_layers: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": (
                "0-based indices of model.model.layers whose outputs feed the side network through ladders, one side "
                "block per entry (None: every layer). Must be None when xladder_depth > 0."
            )
        },
    )
    xladder_depth: int = field(
        default=0,
        metadata={
            "help": (
                "δ: 0 = plain Ladder. δ > 0 = xLadder: the side network branches at backbone layer L-δ, side blocks "
                "1..δ take ladders from the top δ backbone layers, then δ free side blocks follow (side depth 2δ, "
                "effective depth L+δ)."
            )
        },
    )
    gate: Gate = field(
        default="scalar",
        metadata={
            "help": (
                "How a ladder z enters the side stream s: 'scalar' s = μ·s + (1-μ)·z with μ = sigmoid(α/T), one α per "
                "side block (Sung et al.'s LST); 'vector' the same with one α per channel (QST); 'none' s = s + z."
            )
        },
    )
    gate_temperature: float = field(default=0.1, metadata={"help": "T in μ = sigmoid(α/T)."})
    gate_init: float = field(default=0.0, metadata={"help": "α₀, the gates' initial value (0 gives μ = 0.5)."})
    side_init: SideInit = field(
        default="pruned",
        metadata={
            "help": (
                "'pruned': side weights start as the backbone's, keeping the largest-norm channels, heads' rotary "
                "pairs and MLP units (LST's structural pruning), and the ladders start as channel selections; "
                "'random': normal(0, init_std) weights."
            )
        },
    )
    init_std: float = field(
        default=0.02, metadata={"help": "Standard deviation of random side weights (side_init='random')."}
    )
    output_mix: OutputMix = field(
        default="vector",
        metadata={
            "help": (
                "What the frozen lm_head reads: 'vector' a ⊙ h + up_proj(norm(s)) with h the backbone's final normed "
                "hidden state and a per channel (a = 1, up_proj = 0 at step 0: the backbone's own loss); 'scalar' the "
                "same with one a; 'side_only' up_proj(norm(s)) alone, as in the original LST (not the backbone at "
                "step 0)."
            )
        },
    )
    ladder_storage: LadderStorage = field(
        default="bf16",
        metadata={
            "help": (
                "How each ladder input h_l kept for the down-projection's weight gradient is stored: 'bf16' or 'int8' "
                "(per-row absmax, half the memory)."
            )
        },
    )
    ladder_norm: LadderNorm = field(
        default="none",
        metadata={
            "help": (
                "'rms': each ladder reads its input h divided by h's root mean square over the hidden size (no "
                "parameters), so what the side network reads has the same scale on every backbone and layer; 'none': "
                "h as it is."
            )
        },
    )
    backbone_quant: BackboneQuant = field(
        default="nf4",
        metadata={
            "help": (
                "'nf4': quantize the backbone's linear layers (all but lm_head) to NF4 unless already 4-bit; 'none': "
                "keep them as they are."
            )
        },
    )
    loss_chunk_size: int = field(
        default=1024,
        metadata={
            "help": (
                "Tokens per chunk of the fused linear cross-entropy (the [tokens x vocab] logits never exist whole)."
            )
        },
    )
    side_num_heads: Optional[int] = field(
        default=None, metadata={"help": "Side attention heads (None: the backbone's)."}
    )
    side_num_kv_heads: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Side key/value heads, dividing side_num_heads (None: the backbone's, or side_num_heads if that is "
                "set)."
            )
        },
    )
    side_head_dim: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Side head dimension, even (None: the backbone's head_dim // r, rounded down to even, at least 2)."
            )
        },
    )
    side_intermediate_size: Optional[int] = field(
        default=None, metadata={"help": ("Side SwiGLU MLP width (None: the backbone's intermediate_size // r).")}
    )
    side_checkpointing: bool = field(
        default=False,
        metadata={
            "help": (
                "Recompute each side block (with its gate) in the backward instead of keeping its activations: per "
                "layer "
                "only the block's inputs (2 x width per token) stay alive, for about a third more side compute."
            )
        },
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the side blocks' attention and MLP outputs while training."}
    )
    compute_dtype: ComputeDType = field(
        default="auto",
        metadata={
            "help": (
                "dtype of the forward computation: 'auto' keeps the backbone's; otherwise the backbone's floating "
                "parameters are cast to it. Side parameters stay float32 (master weights) and are cast per use."
            )
        },
    )
    backend: Optional[Backend] = field(
        default=None,
        metadata={
            "help": (
                "Kernel backend for the backbone's NF4 matmuls, the down-projections and the cross-entropy: 'triton', "
                "'cpu', 'torch' or None (chosen per call by device)."
            )
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    # --- validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError/TypeError naming the field when a value is out of its domain."""
        _check_int("reduction_factor", self.reduction_factor, minimum=1)
        _check_int("xladder_depth", self.xladder_depth, minimum=0)
        _check_int("loss_chunk_size", self.loss_chunk_size, minimum=1)
        for name in ("side_num_heads", "side_num_kv_heads", "side_head_dim", "side_intermediate_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.side_head_dim is not None and self.side_head_dim % 2:
            raise ValueError(f"LadderConfig.side_head_dim must be even (rotary pairs), got {self.side_head_dim}")
        if (
            self.side_num_heads is not None
            and self.side_num_kv_heads is not None
            and self.side_num_heads % self.side_num_kv_heads
        ):
            raise ValueError(
                f"LadderConfig.side_num_kv_heads ({self.side_num_kv_heads}) must divide side_num_heads "
                f"({self.side_num_heads})"
            )
        if self.ladder_layers is not None:
            if isinstance(self.ladder_layers, (str, bytes)) or not hasattr(self.ladder_layers, "__iter__"):
                raise TypeError(
                    "LadderConfig.ladder_layers must be a list of layer indices or None, got "
                    f"{type(self.ladder_layers).__name__}"
                )
            layers = list(self.ladder_layers)
            for i in layers:
                _check_int("ladder_layers[...]", i, minimum=0)
            if not layers:
                raise ValueError("LadderConfig.ladder_layers must name at least one layer (or be None for all)")
            if layers != sorted(set(layers)):
                raise ValueError(f"LadderConfig.ladder_layers must be strictly increasing, got {layers}")
            if self.xladder_depth > 0:
                raise ValueError(
                    "LadderConfig.ladder_layers must be None when xladder_depth > 0 (xLadder uses the top δ layers)"
                )
            self.ladder_layers = layers
        for name, choices in literal_fields(LadderConfig).items():
            value = getattr(self, name)
            if not (value is None and getattr(LadderConfig, name) is None):  # an Optional field left unset
                _check_choice(name, value, choices)
        if not isinstance(self.side_checkpointing, bool):
            raise TypeError(
                f"LadderConfig.side_checkpointing must be a bool, got {type(self.side_checkpointing).__name__}"
            )
        _check_float("gate_temperature", self.gate_temperature)
        if self.gate_temperature <= 0:
            raise ValueError(f"LadderConfig.gate_temperature must be > 0, got {self.gate_temperature}")
        _check_float("gate_init", self.gate_init)
        _check_float("init_std", self.init_std)
        if self.init_std <= 0:
            raise ValueError(f"LadderConfig.init_std must be > 0, got {self.init_std}")
        _check_float("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LadderConfig.dropout must be in [0, 1), got {self.dropout}")

    # --- (de)serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LadderConfig":
        if not isinstance(values, dict):
            raise TypeError(f"LadderConfig.from_dict: expected a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"LadderConfig: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file in the same directory, then os.replace."""
        write_text_atomic(path, self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LadderConfig":
        with open(path, encoding="utf-8") as f:
            try:
                values = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"LadderConfig.from_json_file: {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(values)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help string."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


def every_nth_layer(num_layers: int, every: int) -> Optional[list[int]]:
    """LadderConfig.ladder_layers for a side block on every `every`-th of `num_layers` backbone layers, counted
    from the top (the top layer always feeds one); None (every layer) for 1."""
    _check_int("every", every, 1)
    return None if every == 1 else sorted(range(num_layers - 1, -1, -every))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LadderConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"LadderConfig.{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"LadderConfig.{name} must be a number, got {type(value).__name__} {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"LadderConfig.{name} must be one of {choices}, got {value!r}")
