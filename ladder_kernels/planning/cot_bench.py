"""`ladder-kernels bench --cot` (bench/bench_cot.py): xLadder's claim measured on the `arith` task.

For each answer format (`--cot full|short|none`), Ladder and xLadder at several depths δ are fine-tuned with the
same number of trainable parameters (xLadder's side MLP width chosen by --match-params ladder) and the same
optimizer steps, over several seeds; QLoRA once per format is the reference. For one format (default `none`) the
same methods also run at equal training wall time: each gets the steps that fit the Ladder runs' mean training time
at its own measured seconds per step (a full learning-rate schedule each, not a cut-off one).

Every cell is a real `ladder-kernels finetune` run (train.run.TrainingRun) in its own folder under `runs_dir`; a
cell whose summary.json exists is read back, not rerun, so an interrupted bench continues where it stopped.
Outputs in `out_dir` (each written atomically): cot_<tag>.csv (one row per run), cot_<tag>.md (mean, spread and
range over seeds per cell) and cot_<tag>.png (exact match against generated tokens per answer).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ladder_kernels.defaults import ARITH_LEVELS, COT_FORMATS
from ladder_kernels.planning.bench import command_line
from ladder_kernels.planning.finetune_cells import (
    figure_png,
    finetune_cell,
    finished,
    runs_csv_text,
    write_bench_files,
)
from ladder_kernels.train.config import FinetuneConfig

CSV_FIELDS = (
    "budget",
    "cot",
    "method",
    "depth",
    "seed",
    "steps",
    "epochs",
    "trainable_parameters",
    "exact_match",
    "exact_match_zero_shot",
    "mean_generated_tokens",
    "eval_seconds",
    "n_eval",
    "train_seconds",
    "seconds_per_step",
    "cold_train_seconds",
    "dtype",
    "run_dir",
)


@dataclass
class CotBenchSettings:
    """What `bench --cot` runs; the defaults are the full table (hours on 2 CPU cores)."""

    model: str = "embedded"
    formats: tuple = COT_FORMATS
    depths: tuple = (4, 8)  # xLadder's δ values
    seeds: tuple = (0, 1, 2)
    # 300 optimizer steps, 100 batches x 3 cached passes for Ladder / xLadder, on the easy problem set: Ladder learns
    # it at that budget (bench/results/cot_probe_smollm2.md: 12% answer alone, 40% step by step, from ~5% zero-shot)
    steps: int = 300  # optimizer steps of every run
    epochs: int = 3  # > 1: Ladder / xLadder take steps / epochs batches E times from the backbone-state cache
    level: str = "easy"  # the arith problem set (--arith-level)
    batch_size: int = 16
    seq_len: int = 112  # the longest full-format arith example is 102 SmolLM2 tokens
    eval_samples: int = 300
    dtype: str = "bfloat16"
    qlora: bool = True
    equal_time_format: Optional[str] = "none"  # None: no equal-wall-time runs
    out_dir: Path = Path("bench/results")
    runs_dir: Path = Path("runs/cot_bench")
    tag: str = "smollm2"
    command: str = field(default_factory=command_line)

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in COT_FORMATS]
        if bad or not self.formats:
            raise ValueError(f"bench --cot: formats must be from {', '.join(COT_FORMATS)}, got {list(self.formats)}")
        if self.equal_time_format is not None and self.equal_time_format not in self.formats:
            raise ValueError(f"bench --cot: equal_time_format {self.equal_time_format!r} is not among the formats")
        for name in ("depths", "seeds"):
            values = getattr(self, name)
            if not values or any(
                isinstance(v, bool) or not isinstance(v, int) or v < (name == "depths") for v in values
            ):
                raise ValueError(f"bench --cot: {name} must be non-empty integers >= {int(name == 'depths')}")
        if self.level not in ARITH_LEVELS:
            raise ValueError(f"bench --cot: level must be one of {', '.join(ARITH_LEVELS)}, got {self.level!r}")
        for name in ("steps", "epochs", "batch_size", "seq_len", "eval_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"bench --cot: {name} must be an integer >= 1, got {value!r}")
        if self.steps % self.epochs:
            raise ValueError(f"bench --cot: steps ({self.steps}) must be a multiple of epochs ({self.epochs})")
        self.out_dir, self.runs_dir = Path(self.out_dir), Path(self.runs_dir)


@dataclass(frozen=True)
class Cell:
    budget: str  # "steps" (equal optimizer steps) or "time" (equal training wall time)
    cot: str
    method: str
    depth: int  # xLadder's δ; 0 for ladder and qlora
    seed: int
    steps: int

    @property
    def name(self) -> str:
        depth = f"-d{self.depth}" if self.depth else ""
        return f"{self.budget}-{self.cot}-{self.method}{depth}-s{self.seed}-{self.steps}steps"


def steps_cells(s: CotBenchSettings) -> list[Cell]:
    """The equal-steps cells: Ladder and each xLadder δ per seed, QLoRA once (seed 0), per format."""
    cells = []
    for cot in s.formats:
        for seed in s.seeds:
            cells.append(Cell("steps", cot, "ladder", 0, seed, s.steps))
            cells += [Cell("steps", cot, "xladder", d, seed, s.steps) for d in s.depths]
        if s.qlora:
            cells.append(Cell("steps", cot, "qlora", 0, s.seeds[0], s.steps))
    return cells


def time_cells(s: CotBenchSettings, rows: list[dict]) -> list[Cell]:
    """The equal-wall-time cells of `equal_time_format`: each method's steps = the Ladder runs' mean training
    time / that method's mean seconds per step (both from the equal-steps rows, cache builds included even where
    a run reused a cache: `cold_train_seconds`). Ladder's own cells are its equal-steps runs (the same steps), so
    they are not rerun."""
    cot = s.equal_time_format
    ours = [r for r in rows if r["budget"] == "steps" and r["cot"] == cot]
    ladder = [float(r["cold_train_seconds"]) for r in ours if r["method"] == "ladder"]
    if cot is None or not ladder:
        return []
    budget = statistics.mean(ladder)
    cells = []
    for method, depth in [("xladder", d) for d in s.depths] + ([("qlora", 0)] if s.qlora else []):
        mine = [r for r in ours if r["method"] == method and r["depth"] == depth]
        per_step = [cold_seconds_per_step(r) for r in mine]
        if not per_step:
            continue
        steps = max(1, round(budget / statistics.mean(per_step)))
        if method != "qlora":  # whole passes over the cached batches
            steps = s.epochs * max(1, round(steps / s.epochs))
        seeds = s.seeds if method != "qlora" else s.seeds[:1]
        cells += [Cell("time", cot, method, depth, seed, steps) for seed in seeds]
    return cells


def cell_config(s: CotBenchSettings, cell: Cell) -> FinetuneConfig:
    """Equal optimizer steps for every method; with epochs E, Ladder and xLadder see steps / E batches E times
    (from the backbone-state cache) and QLoRA, which has no cache, `steps` batches once."""
    epochs = 1 if cell.method == "qlora" else s.epochs
    return FinetuneConfig(
        model=s.model,
        task="arith",
        cot=cell.cot,
        arith_level=s.level,
        method=cell.method,
        xladder_depth=cell.depth or None,
        match_params="ladder" if cell.method == "xladder" else None,
        seq_len=s.seq_len,
        batch_size=s.batch_size,
        steps=cell.steps // epochs,
        epochs=epochs,
        eval_samples=s.eval_samples,
        dtype=s.dtype,
        seed=cell.seed,
        checkpoint_every=max(cell.steps, 1),
        output_dir=str(s.runs_dir / cell.name),
    )


def cold_train_seconds(summary: dict) -> float:
    """Training wall time from nothing: a run that reused a backbone-state cache another run built did not pay
    for the build, so its first build time (recorded with the cache) is added back."""
    cache = summary.get("state_cache")
    if not cache or not cache["reused"]:
        return float(summary["train_seconds"])
    # summaries from before first_build_seconds: the build time per batch times the batches of one pass
    first = cache.get("first_build_seconds")
    if first is None:
        first = cache["backbone_seconds_per_batch"] * summary["steps"] / summary["epochs"]
    return float(summary["train_seconds"]) + first


def cold_seconds_per_step(row: dict) -> float:
    return float(row["cold_train_seconds"]) / int(row["steps"])


def _row(cell: Cell, summary: dict, run_dir: Path) -> dict:
    after = summary["eval_after"]
    return {
        "budget": cell.budget,
        "cot": cell.cot,
        "method": cell.method,
        "depth": cell.depth,
        "seed": cell.seed,
        "steps": summary["steps"],
        "epochs": summary["epochs"],
        "trainable_parameters": summary["trainable_parameters"],
        "exact_match": summary["accuracy_after"],
        "exact_match_zero_shot": summary["accuracy_before"],
        "mean_generated_tokens": after["mean_generated_tokens"],
        "eval_seconds": after["eval_seconds"],
        "n_eval": after["n"],
        "train_seconds": summary["train_seconds"],
        "seconds_per_step": summary["seconds_per_step"],
        "cold_train_seconds": cold_train_seconds(summary),
        "dtype": summary["dtype"],
        "run_dir": str(run_dir),
    }


def run_cell(s: CotBenchSettings, cell: Cell, zero_shot: dict) -> dict:
    """One finetune run (or its summary read back); `zero_shot` caches the backbone's zero-shot result per format:
    every Ladder / xLadder run starts exactly at the backbone (the output mix starts at it), so it is evaluated
    once per format."""
    shares = cell.method != "qlora"
    summary = finetune_cell(cell_config(s, cell), zero_shot.get(cell.cot) if shares else None, "bench --cot")
    if shares:
        zero_shot.setdefault(cell.cot, summary["eval_before"])
    return _row(cell, summary, s.runs_dir / cell.name)


def run_cot_bench(s: CotBenchSettings, write: bool = False, train: bool = True) -> list[dict]:
    """Every cell, equal-steps first (the equal-time cells are sized from them); returns one row per run. With
    `write`, the result files are rewritten after every cell (an interrupted bench leaves a consistent table);
    without `train`, only finished cells are read (the tables of a bench still running elsewhere)."""
    zero_shot: dict = {}
    rows: list[dict] = []
    done: dict[tuple, dict] = {}  # an equal-time cell with an equal-steps cell's very settings is that run
    for phase in (lambda: steps_cells(s), lambda: time_cells(s, rows)):
        for cell in phase():
            key = (cell.cot, cell.method, cell.depth, cell.seed, cell.steps)
            if key in done:
                rows.append({**done[key], "budget": cell.budget})
            elif train or finished(s.runs_dir / cell.name):
                rows.append(run_cell(s, cell, zero_shot))
            else:
                continue
            done.setdefault(key, rows[-1])
            if write:
                write_cot_results(rows, s.out_dir, s.tag, s.command)
    return rows


# --- results -----------------------------------------------------------------------------------------------
def aggregate(rows: list[dict]) -> list[dict]:
    """Per (budget, format, method, δ): mean, sample standard deviation and range of exact match over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["cot"], r["method"], int(r["depth"])), []).append(r)
    order = {c: i for i, c in enumerate(COT_FORMATS)}
    out = []
    for (budget, cot, method, depth), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2:])
    ):
        acc = [float(r["exact_match"]) for r in rs]
        out.append(
            {
                "budget": budget,
                "cot": cot,
                "method": method,
                "depth": depth,
                "seeds": len(rs),
                "mean": statistics.mean(acc),
                "std": statistics.stdev(acc) if len(acc) > 1 else None,
                "min": min(acc),
                "max": max(acc),
                "tokens": statistics.mean(float(r["mean_generated_tokens"]) for r in rs),
                "params": statistics.mean(int(r["trainable_parameters"]) for r in rs),
                "steps": statistics.mean(int(r["steps"]) for r in rs),
                "seconds_per_step": statistics.mean(cold_seconds_per_step(r) for r in rs),
                "eval_seconds": statistics.mean(float(r["eval_seconds"]) for r in rs),
                "n_eval": int(rs[0]["n_eval"]),
                "zero_shot": float(rs[0]["exact_match_zero_shot"]),
            }
        )
    return out


def label(g: dict) -> str:
    return f"xladder δ={g['depth']}" if g["method"] == "xladder" else g["method"]


def passes_note(rows: list[dict]) -> list[str]:
    """What the steps column counts when Ladder / xLadder trained several passes from the backbone-state cache."""
    passes = sorted({int(r["epochs"]) for r in rows if r["method"] != "qlora"})
    if passes == [1]:
        return []
    return [
        f"Ladder and xLadder take steps / E batches E times (E = {', '.join(map(str, passes))}) from the "
        "backbone-state cache; QLoRA takes `steps` batches once. s/step counts the cache build, also where a run "
        "found its cache on disk (the build time recorded with the cache is added back).",
        "",
    ]


def markdown(rows: list[dict], command: str) -> str:
    groups = aggregate(rows)
    lines = [
        "# xLadder vs Ladder on `arith`, by answer format",
        "",
        f"Command: `{command}`",
        "",
        "Exact match of the final number on held-out problems under greedy decoding: the mean over seeds ± the "
        "sample standard deviation [min–max]. Ladder and xLadder have the same trainable parameters (xLadder's side "
        "MLP width chosen by `--match-params ladder`); QLoRA is one seed. `steps`: equal optimizer steps; `time`: "
        "equal training wall time (each method's steps fit the Ladder runs' mean training time).",
        "",
        *passes_note(rows),
        "| budget | format | method | seeds | exact match | tokens / answer | trainable params | steps | s/step | "
        "eval s | zero-shot |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        spread = f" ± {100 * g['std']:.1f}" if g["std"] is not None else ""
        lines.append(
            f"| {g['budget']} | {g['cot']} | {label(g)} | {g['seeds']} | {100 * g['mean']:.1f}%{spread} "
            f"[{100 * g['min']:.0f}–{100 * g['max']:.0f}] | {g['tokens']:.1f} | {g['params'] / 1e6:.3f} M | "
            f"{g['steps']:.0f} | {g['seconds_per_step']:.2f} | {g['eval_seconds']:.0f} | {100 * g['zero_shot']:.0f}% |"
        )
    n_eval = groups[0]["n_eval"] if groups else 0
    noise = 100 * (0.25 / max(1, n_eval)) ** 0.5
    lines += [
        "",
        f"Held-out problems per run: {n_eval} (binomial sampling noise up to ±{noise:.1f} points per run).",
        "",
    ]
    return "\n".join(lines)


def plot_png(rows: list[dict], tag: str = "") -> bytes:
    """Exact match (mean ± std over seeds) against generated tokens per answer; colour = format, marker = method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"full": "tab:blue", "short": "tab:orange", "none": "tab:green"}
    markers = {"ladder": "o", "qlora": "^"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    depth_markers = ("s", "D", "P", "X", "v")
    groups = aggregate(rows)
    depths = sorted({g["depth"] for g in groups if g["method"] == "xladder"})
    # methods of one format generate about as many tokens: each is drawn a little aside so none hides another
    methods = sorted({(g["budget"], g["method"], g["depth"]) for g in groups})
    for g in groups:
        marker = markers.get(g["method"]) or depth_markers[depths.index(g["depth"]) % len(depth_markers)]
        aside = 0.25 * (methods.index((g["budget"], g["method"], g["depth"])) - (len(methods) - 1) / 2)
        ax.errorbar(
            g["tokens"] + aside,
            100 * g["mean"],
            yerr=None if g["std"] is None else 100 * g["std"],
            fmt=marker,
            color=colours[g["cot"]],
            mfc="none" if g["budget"] == "time" else colours[g["cot"]],
            capsize=3,
            label=f"{g['cot']} {label(g)}" + (" (equal time)" if g["budget"] == "time" else ""),
        )
    ax.set_xlabel("generated tokens per answer (mean; methods drawn 0.25 apart)")
    ax.set_ylabel("held-out exact match (%)")
    run = f"arith ({tag})" if tag else "arith"
    ax.set_title(f"{run}: exact match vs answer length (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return figure_png(fig, dpi=120)


def write_cot_results(rows: list[dict], out_dir: Path, tag: str, command: str) -> list[Path]:
    return write_bench_files(
        out_dir, f"cot_{tag}", runs_csv_text(rows, CSV_FIELDS, command), markdown(rows, command), plot_png(rows, tag)
    )
