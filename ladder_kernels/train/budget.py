"""`finetune --gpu-memory`: the settings that fit a memory budget, chosen by the memory planner.

The planner (planning/planner.py) answers whether one setting fits; this module asks it about settings in the
order of defaults.BUDGET_FIT_ORDER, cheapest first: the micro-batch (with gradient accumulation keeping the
examples per optimizer step), then int8 ladder storage, then side checkpointing, then a side block on fewer layers.
Each "level" adds the next change to the ones before it; the first level at which a micro-batch of one fits is
chosen, with the largest micro-batch that fits there. An option the user gave explicitly is never changed.

Each level builds one fake model (`TrackedTraining`, no weights) and steps it at candidate micro-batches; the
chosen setting is then planned once more with `plan()`, whose peak is what is printed and recorded.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ladder_kernels.defaults import BUDGET_LADDER_EVERY, DEFAULT_LADDER_EVERY, default_xladder_depth
from ladder_kernels.errors import ConfigError
from ladder_kernels.planning.planner import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    MemoryPlan,
    TrackedTraining,
    load_config,
    plan,
    required_bytes,
    shipped_models,
)
from ladder_kernels.train.config import FinetuneConfig, flag, ladder_config
from ladder_kernels.units import format_gib, parse_bytes

# the options --gpu-memory may set, as FinetuneConfig fields
FITTED_FIELDS = ("batch_size", "grad_accum", "ladder_storage", "side_checkpointing", "ladder_every", "xladder_depth")


def budget_bytes(text: str) -> int:
    """--gpu-memory as bytes: a size, or 'auto' (the current CUDA device's total memory)."""
    if text == "auto":
        if not torch.cuda.is_available():
            raise ConfigError(
                "--gpu-memory auto reads the CUDA device's memory, and there is no CUDA device here; give a size "
                "such as --gpu-memory 12GB"
            )
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        return parse_bytes(text)
    except ValueError:
        raise ConfigError(f"--gpu-memory must be a size such as 12GB, 24000MiB or 'auto', got {text!r}") from None


def model_config(model: str, plan_only: bool = False):
    """The transformers config the planner needs for --model: a shipped config name (with --plan-only), or the
    config.json of the checkpoint --model resolves to."""
    from ladder_kernels.train.backbones import resolve_model

    if plan_only and model in shipped_models() and not Path(model).exists():
        return load_config(model)
    return load_config(resolve_model(model))


@dataclass
class BudgetFit:
    """The chosen configuration, its planned peak, and what was changed to fit."""

    cfg: FinetuneConfig
    budget: int | None  # bytes; None: no budget given (the plan of the setting as it is)
    plan: MemoryPlan
    changed: dict = field(default_factory=dict)  # field -> (before, after)
    kept: tuple = ()  # fitted fields the user gave explicitly
    levels_tried: int = 1

    def settings(self) -> str:
        """The fitted options as `finetune` flags (every one that applies to the method)."""
        parts = [flag("batch_size"), str(self.cfg.batch_size), flag("grad_accum"), str(self.cfg.grad_accum)]
        if self.cfg.method != "qlora":
            parts += [flag("ladder_storage"), self.cfg.ladder_storage]
            parts.append(flag("side_checkpointing") if self.cfg.side_checkpointing else "--no-side-checkpointing")
            if self.cfg.method == "ladder":
                parts += [flag("ladder_every"), str(self.cfg.ladder_every or DEFAULT_LADDER_EVERY)]
            elif self.cfg.xladder_depth is not None:
                parts += [flag("xladder_depth"), str(self.cfg.xladder_depth)]
        return " ".join(shlex.quote(p) for p in parts)

    def lines(self) -> list[str]:
        cfg, p = self.cfg, self.plan
        head = (
            f"{cfg.method} on {cfg.model} at --seq-len {cfg.seq_len}, {cfg.batch_size * cfg.grad_accum} examples per "
            f"optimizer step, {cfg.dtype_name}"
        )
        out = [
            f"memory budget {format_gib(self.budget)} (--gpu-memory {cfg.gpu_memory}): {head}" if self.budget else head
        ]
        changes = ", ".join(f"{flag(k)} {_show(a)} -> {_show(b)}" for k, (a, b) in self.changed.items())
        if self.budget is not None:
            out.append(f"  changed to fit: {changes or 'nothing (the settings as given fit)'}")
        if self.kept:
            out.append(f"  kept as given: {', '.join(flag(k) for k in self.kept)}")
        out.append(f"  settings: {self.settings()}")
        verdict = ""
        if self.budget is not None:
            verdict = (
                f" <= budget {format_gib(self.budget)}"
                if p.fits(self.budget)
                else f" > budget {format_gib(self.budget)}"
            )
        out.append(
            f"  planned peak {format_gib(p.peak_bytes)}; needs {format_gib(p.required_bytes)} (peak x "
            f"{1 + ALLOCATOR_SLACK:.2f} + {CUDA_CONTEXT_BYTES // 2**20} MiB CUDA context){verdict}"
        )
        return out

    def to_dict(self) -> dict:
        return {
            "gpu_memory": self.cfg.gpu_memory,
            "budget_bytes": self.budget,
            "planned_peak_bytes": self.plan.peak_bytes,
            "planned_required_bytes": self.plan.required_bytes,
            "settings": self.settings(),
            "changed": {k: list(v) for k, v in self.changed.items()},
            "kept_as_given": list(self.kept),
            "plan": self.plan.to_dict(),
        }


def _show(value) -> str:
    return "on" if value is True else "off" if value is False else "default" if value is None else str(value)


def _levels(cfg: FinetuneConfig, explicit: set, num_layers: int) -> list[dict]:
    """Cumulative changes in BUDGET_FIT_ORDER after the micro-batch: [{}, {ladder_storage: int8}, ...]."""
    levels, current = [{}], {}
    if cfg.method == "qlora":
        return levels

    def add(**change):
        current.update(change)
        levels.append(dict(current))

    if "ladder_storage" not in explicit and cfg.ladder_storage != "int8":
        add(ladder_storage="int8")
    if "side_checkpointing" not in explicit and not cfg.side_checkpointing:
        add(side_checkpointing=True)
    if cfg.method == "ladder" and "ladder_every" not in explicit:
        every = cfg.ladder_every or DEFAULT_LADDER_EVERY
        for n in BUDGET_LADDER_EVERY:
            if every < n <= num_layers:
                add(ladder_every=n)
    if cfg.method == "xladder" and "xladder_depth" not in explicit:
        depth = cfg.xladder_depth or default_xladder_depth(num_layers)
        while depth > 1:
            depth //= 2
            add(xladder_depth=depth)
    return levels


def _micro_batches(cfg: FinetuneConfig, explicit: set, world_size: int) -> list[int]:
    """Candidate micro-batches, ascending: the divisors of the examples per optimizer step (at least one per
    process), or the given --batch-size alone when --batch-size or --grad-accum was given."""
    if "batch_size" in explicit or "grad_accum" in explicit:
        return [cfg.batch_size]
    total = cfg.batch_size * cfg.grad_accum
    return [b for b in range(1, total + 1) if total % b == 0 and b >= min(world_size, total)]


def _planner_options(cfg: FinetuneConfig, num_layers: int) -> dict:
    if cfg.method == "qlora":
        return {}
    lc = ladder_config(cfg, num_layers)
    keys = ("reduction_factor", "ladder_layers", "xladder_depth", "ladder_storage", "side_checkpointing")
    return {k: getattr(lc, k) for k in keys}


def fit_to_budget(
    cfg: FinetuneConfig, explicit=None, config=None, world_size: int = 1, plan_only: bool = False
) -> BudgetFit:
    """The settings of `cfg` changed (in BUDGET_FIT_ORDER, never an `explicit` field) to fit `cfg.gpu_memory`;
    with no --gpu-memory, the plan of `cfg` as it is. `explicit`: field names the user gave (default: the fields
    that differ from FinetuneConfig's defaults). `config`: the model's transformers config (default: from
    cfg.model). A ConfigError names the smallest budget that would fit when nothing does."""
    from tqdm.auto import tqdm

    if explicit is None:
        defaults = FinetuneConfig()
        explicit = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    explicit = set(explicit)
    cfg.validate()
    config = config if config is not None else model_config(cfg.model, plan_only)
    layers, dtype = config.num_hidden_layers, cfg.torch_dtype
    share = lambda b: -(-b // world_size)  # noqa: E731 - one process's part of a micro-batch
    kept = tuple(k for k in FITTED_FIELDS if k in explicit)
    if cfg.gpu_memory is None:
        p = plan(config, cfg.method, cfg.seq_len, share(cfg.batch_size), dtype, **_planner_options(cfg, layers))
        return BudgetFit(cfg, None, p, kept=kept)
    budget = budget_bytes(cfg.gpu_memory)
    batches, total = _micro_batches(cfg, explicit, world_size), cfg.batch_size * cfg.grad_accum
    smallest, levels = None, _levels(cfg, explicit, layers)
    for n, change in enumerate(tqdm(levels, desc=f"fitting {format_gib(budget)}", unit="setting", leave=False)):
        trial = dataclasses.replace(cfg, **change)
        with TrackedTraining(config, cfg.method, dtype, fake=True, **_planner_options(trial, layers)) as run:
            run.peak_of_steps(cfg.seq_len, share(batches[0]), 1)  # warm-up: the optimizer state exists
            peaks = {batches[0]: run.peak_of_steps(cfg.seq_len, share(batches[0]), 1)[0]}
            required = required_bytes(peaks[batches[0]])
            smallest = required if smallest is None else min(smallest, required)
            if required > budget:
                continue
            best = _largest_fitting(lambda b: run.peak_of_steps(cfg.seq_len, share(b), 1)[0], batches, peaks, budget)
        while True:  # the planner's own figure for the choice (a smaller micro-batch if it disagrees)
            if "batch_size" not in explicit and "grad_accum" not in explicit:
                change = {**change, "batch_size": best, "grad_accum": total // best}
            chosen = dataclasses.replace(cfg, **change)
            p = plan(
                config, cfg.method, cfg.seq_len, share(chosen.batch_size), dtype, **_planner_options(chosen, layers)
            )
            smaller = [b for b in batches if b < best]
            if p.fits(budget) or not smaller:
                break
            best = smaller[-1]
        if not p.fits(budget):
            smallest = min(smallest, p.required_bytes)
            continue
        changed = {
            k: (getattr(cfg, k), getattr(chosen, k)) for k in FITTED_FIELDS if getattr(cfg, k) != getattr(chosen, k)
        }
        return BudgetFit(chosen, budget, p, changed, kept, n + 1)
    leanest = ", ".join(f"{flag(k)} {_show(v)}" for k, v in levels[-1].items())
    given = f"; kept as given: {', '.join(flag(k) for k in kept)}" if kept else ""
    raise ConfigError(
        f"--gpu-memory {cfg.gpu_memory}: no setting fits {format_gib(budget)} for {cfg.method} at --seq-len "
        f"{cfg.seq_len}; the leanest (micro-batch {batches[0]}{', ' + leanest if leanest else ''}{given}) needs "
        f"{format_gib(smallest)}: give --gpu-memory {_round_up_gib(smallest)} or more, or lower --seq-len"
    )


def _largest_fitting(peak_at, batches: list[int], peaks: dict, budget: int) -> int:
    """The largest candidate micro-batch whose peak fits: peaks grow about linearly with the micro-batch, so the
    guess comes from the line through the two smallest, then steps down until one fits."""
    if len(batches) == 1:
        return batches[0]
    peaks[batches[1]] = peak_at(batches[1])
    (b1, p1), (b2, p2) = (batches[0], peaks[batches[0]]), (batches[1], peaks[batches[1]])
    slope = max((p2 - p1) / (b2 - b1), 1.0)
    limit = (budget - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_SLACK)
    guess = [b for b in batches if p1 + (b - b1) * slope <= limit] or [b1]
    for b in reversed([b for b in batches if b <= guess[-1]]):
        if b not in peaks:
            peaks[b] = peak_at(b)
        if required_bytes(peaks[b]) <= budget:
            return b
    return batches[0]


def _round_up_gib(n: int) -> str:
    """A budget in GB (= GiB), rounded up to a tenth: what to pass to --gpu-memory."""
    tenths = -(-n * 10 // 2**30)
    return f"{tenths / 10:g}GB"
