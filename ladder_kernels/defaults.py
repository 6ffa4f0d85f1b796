"""Every default and every fixed set of choices, once. Config fields are typed with the Literal types below;
command-line choices and validation read the same types (`choices_of`), so a value has one source."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Literal, get_args

import torch

# --- methods ----------------------------------------------------------------------------------------------
LadderMethod = Literal["ladder", "xladder"]
QLoRAMethod = Literal["qlora", "qlora-ckpt", "qlora-lk"]
FinetuneMethod = Literal["ladder", "xladder", "qlora"]  # what `ladder-kernels finetune` trains
LADDER_METHODS: tuple[str, ...] = get_args(LadderMethod)
QLORA_METHODS: tuple[str, ...] = get_args(QLoRAMethod)
METHODS: tuple[str, ...] = LADDER_METHODS + QLORA_METHODS  # what the planner and the benchmark compare
FINETUNE_METHODS: tuple[str, ...] = get_args(FinetuneMethod)
PLAN_METHODS = ("ladder", "xladder", "qlora", "qlora-ckpt")  # the planner table's default rows

# Peak learning rates, measured on the embedded sentiment task (bench/results/finetune_sentiment.md): side
# networks take larger steps than LoRA. finetune, plan and bench all train with these.
DEFAULT_LR = {"ladder": 6e-3, "xladder": 4e-3, "qlora": 5e-4, "qlora-ckpt": 5e-4, "qlora-lk": 5e-4}
LORA_R = 16
# `ladder-kernels bench`: timed steps per method and cell (the median of 10 after the warm-up held the speed ratios
# within 20% between runs on a shared CPU; 2 steps swung them 10x) and untimed warm-up rounds first.
BENCH_STEPS = 10
BENCH_WARMUP = 2


def default_lr(method: str, lr_rule: str = "uniform") -> float:
    """The peak learning rate of `method` under `lr_rule` (QLoRA's is always an absolute rate)."""
    if lr_rule == "relative" and method in DEFAULT_RELATIVE_LR:
        return DEFAULT_RELATIVE_LR[method]
    return DEFAULT_LR[method]


# --- dtypes -----------------------------------------------------------------------------------------------
DTypeName = Literal["float32", "bfloat16", "float16"]
# --dtype "auto": bfloat16 on a CUDA device, float32 on CPU: a CPU without native bf16 (no AVX-512-BF16/AMX) runs
# bf16 matmuls tens of times slower than fp32 (measured: 80x on an AMD EPYC with AVX2 only), and on one with it an
# all-bf16 Ladder run learns worse (SmolLM2 2 points lower, Gemma-3-270M's loss spiking to 2.2x: bench/results/
# finetune_bf16_cpu.md). --matmul-dtype "auto" then multiplies only the backbone's NF4 layers in bf16 where the CPU
# has native bf16 (backends.cpu_has_native_bf16; ~3x fp32's speed), everything else in fp32. So `make demo`'s
# result is the same on every machine of one kind, and differs (within seed noise) between bf16 and fp32 CPUs.
FinetuneDType = Literal["auto", "float32", "bfloat16"]
ComputeDType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_from_name(name) -> torch.dtype:
    """A torch dtype from a torch.dtype, a DTYPES name or an alias (bf16, fp16, fp32)."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    key = DTYPE_ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in DTYPES:
        raise ValueError(
            f"dtype must be one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)} or a torch dtype, got {name!r}"
        )
    return DTYPES[key]


# --- kernels ----------------------------------------------------------------------------------------------
Backend = Literal["triton", "cpu", "torch"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# The C++ NF4 kernels' instruction set: "auto" takes the CPU's best; the environment variable forces one (tests).
CpuIsa = Literal["auto", "avx512", "avx2", "scalar"]
CPU_ISAS: tuple[str, ...] = get_args(CpuIsa)
CPU_ISA_ENV = "LADDER_KERNELS_CPU_ISA"
# "0" or "1": whether --matmul-dtype auto takes this CPU for one with native bf16 (default: what the CPU says).
# The tests set "0", so they compute alike on every CI machine.
CPU_BF16_ENV = "LADDER_KERNELS_CPU_BF16"
POISON_OUTPUTS_ENV = "LADDER_KERNELS_POISON_OUTPUTS"  # "1": the C++ kernels' outputs start as NaN (tests)
LadderStorage = Literal["bf16", "int8"]
LADDER_STORAGES: tuple[str, ...] = get_args(LadderStorage)
NF4_BLOCKSIZE = 64

# --- the side network -------------------------------------------------------------------------------------
Gate = Literal["scalar", "vector", "none"]
SideInit = Literal["pruned", "random"]
OutputMix = Literal["vector", "scalar", "side_only"]
LadderNorm = Literal["none", "rms"]  # what a ladder does to its input before the down-projection (nn/side.py)
BackboneQuant = Literal["nf4", "none"]
# `ladder-kernels finetune` and `plan` put a side block on every 3rd layer: measured on SmolLM2 sentiment, faster
# steps, less memory and better accuracy than every layer; on Llama-2-7B it triples the context that fits 12 GB.
DEFAULT_LADDER_EVERY = 3
# How the side network's learning rate is spread over its tensors (nn/step_sizes.py): "relative" scales it by each
# tensor's own initial rms, so a step changes every tensor by about the same fraction on any backbone.
LrRule = Literal["relative", "uniform"]
LR_RULES: tuple[str, ...] = get_args(LrRule)
# Chosen by bench/sweep_cached.py on two backbones (bench/results/ladder_sweep_lr_rule_*.md): relative 0.02 ties the
# best absolute rate on SmolLM2-135M (55.8% vs 55.7% at 6e-3) and beats 6e-3 on Gemma-3-270M (59.2% vs 56.1%),
# where each absolute rate is good on one family only (1e-3: 49.0% on SmolLM2, 59.4% on Gemma).
DEFAULT_LR_RULE: LrRule = "relative"
# With lr_rule "relative" the learning rate is the fraction of each tensor's own scale an Adam step moves it by.
DEFAULT_RELATIVE_LR = {"ladder": 0.02, "xladder": 0.02}
# `finetune` warns (once) when a step's loss exceeds this many times the mean of the steps before it (the last
# LOSS_SPIKE_WINDOW of them, once LOSS_SPIKE_MIN_STEPS exist): a sign the learning rate is too high.
LOSS_SPIKE_FACTOR = 3.0
LOSS_SPIKE_WINDOW = 20
LOSS_SPIKE_MIN_STEPS = 5


# --- fitting a memory budget (`ladder-kernels finetune --gpu-memory`) -----------------------------------------
# The settings `--gpu-memory` may change, cheapest first (what each costs): the micro-batch, with gradient
# accumulation keeping the examples per optimizer step (speed only); int8 ladder storage (a small rounding of the
# kept ladder inputs); side checkpointing (about a third more side compute); a side block on fewer layers
# (ladder: every BUDGET_LADDER_EVERY-th layer in turn; xladder: half the depth δ in turn; accuracy). Each is tried
# only after the ones before it are at their leanest; a setting given explicitly is never changed.
BudgetSetting = Literal["micro_batch", "ladder_storage", "side_checkpointing", "ladder_layers"]
BUDGET_FIT_ORDER: tuple[str, ...] = get_args(BudgetSetting)
BUDGET_LADDER_EVERY = (4, 6, 8, 12, 16)


def default_xladder_depth(num_layers: int) -> int:
    """δ for xLadder when none is given: a quarter of the backbone's layers, at least 1."""
    return max(1, num_layers // 4)


# --- the backbone-state cache (`ladder-kernels finetune --epochs E`) -----------------------------------------
# Its files live in <cache root>/STATE_CACHE_FOLDER (the cache root: $LADDER_KERNELS_CACHE, else
# $XDG_CACHE_HOME/ladder_kernels). By default none of it is held in process memory: reads go through the OS page
# cache, as fast from the second epoch on and not counted in the process's RSS (Ladder's memory target).
STATE_CACHE_FOLDER = "states"
DEFAULT_CACHE_MEMORY = "0"
# finetune --steps (optimizer steps of one epoch) and --epochs (passes over those batches), per method. A side
# network trains from the cache after the first pass (the backbone runs once per example), so more passes cost
# little: Ladder reads QLoRA's 100 batches 3 times (300 steps, 3200 examples). Half the data read twice as often
# (50 x 6) halves the backbone's pass but cost 2.8 points on SmolLM2 (3 seeds, sd ~2, fp32:
# bench/results/finetune_defaults_avx512.md); bf16 4-bit matmuls on CPUs that have them (--matmul-dtype auto) make
# the pass short enough for 100 x 3 (bench/results/finetune_bf16_cpu.md). QLoRA has no cache: one pass of 100 steps.
DEFAULT_STEPS = {"ladder": 100, "xladder": 100, "qlora": 100}
DEFAULT_EPOCHS = {"ladder": 3, "xladder": 3, "qlora": 1}
# finetune --warmup-steps when not given: this fraction of the run's optimizer steps (QLoRA's 100: 10, as before;
# Ladder's 300: 30). Chosen by bench/sweep_cached.py on two backbones (bench/results/ladder_sweep_*_warmup.md): on
# Gemma-3-270M 10 warm-up steps of 300 let the loss jump to 8.9x its first steps' mean right after the warm-up, 30
# kept it under 1.2x and gave 2 points more accuracy.
DEFAULT_WARMUP_FRACTION = 0.1


def default_warmup(total_steps: int) -> int:
    """Warm-up steps of a run of `total_steps` optimizer steps when none are given."""
    return round(DEFAULT_WARMUP_FRACTION * total_steps)


# --- tasks ------------------------------------------------------------------------------------------------
Task = Literal["sentiment", "arith"]
TASKS: tuple[str, ...] = get_args(Task)
DEFAULT_EVAL_SAMPLES = {"sentiment": 300, "arith": 100}
# `arith` answer formats: every step, only the last step, or the answer alone; each ends "The answer is N."
CoTFormat = Literal["full", "short", "none"]
COT_FORMATS: tuple[str, ...] = get_args(CoTFormat)
# `arith` problem sets: `standard` (2-3 operations on numbers up to 40, products included) or `easy` (exactly 2
# operations, amounts up to 9, answers under 60): a budget where a small side network learns the task on a CPU.
ArithLevel = Literal["standard", "easy"]
ARITH_LEVELS: tuple[str, ...] = get_args(ArithLevel)
# `bench --accuracy`: the methods it trains; ladder-cache is Ladder with the backbone-state cache (--epochs E over
# the same examples).
AccuracyMethod = Literal["ladder", "ladder-cache", "xladder", "qlora"]
ACCURACY_METHODS: tuple[str, ...] = get_args(AccuracyMethod)
# Equal-parameter builds (`--match-params`): the side MLP width is chosen so that the trainable count is within
# this fraction of the target (ladder and xladder then differ in depth and wiring, not in size).
MATCH_PARAMS_TOLERANCE = 0.05

# --- chat-format data (`messages` rows) -------------------------------------------------------------------
ChatRole = Literal["system", "user", "assistant"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)
# Chat rows are scored as classification (restricted argmax over the replies' first tokens) when their last
# assistant turns take at most MAX_CLASSES distinct values and each value occurs CHAT_ROWS_PER_CLASS times on
# average; otherwise by exact match of the greedy reply.
MAX_CLASSES = 50
CHAT_ROWS_PER_CLASS = 4


def choices_of(hint) -> tuple | None:
    """The values a Literal type (or Optional[Literal]) admits; None for other types."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if getattr(hint, "__origin__", None) is Literal:
        return tuple(get_args(hint))
    if len(args) == 1 and getattr(args[0], "__origin__", None) is Literal:
        return tuple(get_args(args[0]))
    return None


@functools.cache
def literal_fields(cls) -> dict[str, tuple]:
    """Field name -> the values its Literal type admits, for the fields of dataclass `cls` that have one."""
    hints = typing.get_type_hints(cls)
    return {f.name: c for f in dataclasses.fields(cls) if (c := choices_of(hints[f.name])) is not None}
