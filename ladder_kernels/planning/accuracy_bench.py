"""`ladder-kernels bench --accuracy` (bench/bench_accuracy.py): held-out accuracy against training compute on the
embedded sentiment task.

Methods (`--methods`): ladder (one pass, `--epochs 1`: the backbone every step), ladder-cache (Ladder with the
backbone-state cache: `--epochs E`, default finetune's,
passes over the same examples, the backbone run once per example), xladder and qlora, each at several training
budgets and seeds. A budget is the optimizer steps of one pass over the data (FinetuneConfig.steps): every method
sees the same batches at a budget, ladder-cache sees them E times (E x budget optimizer steps).

Every cell is a real `ladder-kernels finetune` run (train.run.TrainingRun) in its own folder under `runs_dir`; a
cell whose summary.json exists is read back, not rerun. Per cell: held-out and zero-shot accuracy, the measured
training wall time (the cache method's caching pass included), training FLOPs counted analytically (planning/
flops.py, from the exact token counts of the run's batches) and the final training loss. Per method a least-squares
fit of log(loss) against log(FLOPs) gives the compute-scaling slope (the paper's "same slope as QLoRA" claim).
Outputs in `out_dir` (each written atomically): accuracy_<tag>.csv (one row per run), accuracy_<tag>.md (the table,
the slopes, the command) and accuracy_<tag>.png (accuracy vs wall time, accuracy vs FLOPs, loss vs FLOPs).
"""

from __future__ import annotations

import math
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ladder_kernels.defaults import ACCURACY_METHODS, DEFAULT_EPOCHS
from ladder_kernels.planning.bench import command_line
from ladder_kernels.planning.finetune_cells import (
    figure_png,
    finetune_cell,
    finished,
    runs_csv_text,
    write_bench_files,
)
from ladder_kernels.planning.flops import Batch, ModelShape, run_flops
from ladder_kernels.train.config import FinetuneConfig, ladder_config
from ladder_kernels.train.report import mean_tail

TASK = "sentiment"
LOSS_TAIL = 5  # the final training loss: the mean of the last LOSS_TAIL steps' losses
CACHE_FOLDER = "state_cache"  # the cache method's cache, inside its run folder, removed once the run finished
CSV_FIELDS = (
    "method",
    "budget",
    "epochs",
    "seed",
    "steps",
    "accuracy",
    "accuracy_zero_shot",
    "n_eval",
    "train_seconds",
    "seconds_per_step",
    "training_flops",
    "final_loss",
    "peak_memory_bytes",
    "trainable_parameters",
    "dtype",
    "run_dir",
)


@dataclass
class AccuracyBenchSettings:
    """What `bench --accuracy` runs; the defaults are the full table (hours on 2 CPU cores)."""

    model: str = "embedded"
    methods: tuple = ACCURACY_METHODS
    budgets: tuple = (25, 50, 100)  # optimizer steps of one pass over the data
    epochs: int = DEFAULT_EPOCHS["ladder"]  # ladder-cache's passes
    seeds: tuple = (0, 1, 2)
    eval_samples: int = 1000
    batch_size: Optional[int] = None  # None: finetune's default
    seq_len: Optional[int] = None
    dtype: str = "auto"
    out_dir: Path = Path("bench/results")
    runs_dir: Path = Path("runs/accuracy_bench")
    tag: str = "smollm2"
    command: str = field(default_factory=command_line)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in ACCURACY_METHODS]
        if bad or not self.methods:
            raise ValueError(
                f"bench --accuracy: methods must be from {', '.join(ACCURACY_METHODS)}, got {list(self.methods)}"
            )
        for name, minimum in (("budgets", 1), ("seeds", 0)):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
                raise ValueError(f"bench --accuracy: {name} must be non-empty integers >= {minimum}, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"bench --accuracy: {name} must not repeat a value, got {values!r}")
        for name, minimum in (("epochs", 2), ("eval_samples", 1), ("batch_size", 1), ("seq_len", 8)):
            value = getattr(self, name)
            if value is None and name in ("batch_size", "seq_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"bench --accuracy: {name} must be an integer >= {minimum}, got {value!r}")
        self.out_dir, self.runs_dir = Path(self.out_dir), Path(self.runs_dir)


@dataclass(frozen=True)
class Cell:
    method: str  # one of ACCURACY_METHODS
    budget: int  # optimizer steps of one pass over the data
    epochs: int  # passes (1 but for ladder-cache)
    seed: int

    @property
    def name(self) -> str:
        epochs = f"-e{self.epochs}" if self.epochs > 1 else ""
        return f"{self.method}-b{self.budget}{epochs}-s{self.seed}"


def cells(s: AccuracyBenchSettings) -> list[Cell]:
    """Every (method, budget, seed), smallest budgets first (a partial bench already spans the methods)."""
    return [
        Cell(method, budget, s.epochs if method == "ladder-cache" else 1, seed)
        for budget in sorted(s.budgets)
        for seed in s.seeds
        for method in s.methods
    ]


def cell_config(s: AccuracyBenchSettings, cell: Cell) -> FinetuneConfig:
    out = s.runs_dir / cell.name
    sizes = {k: v for k, v in (("batch_size", s.batch_size), ("seq_len", s.seq_len)) if v is not None}
    return FinetuneConfig(
        model=s.model,
        task=TASK,
        method="ladder" if cell.method == "ladder-cache" else cell.method,
        steps=cell.budget,
        epochs=cell.epochs,
        eval_samples=s.eval_samples,
        dtype=s.dtype,
        seed=cell.seed,
        checkpoint_every=cell.budget * cell.epochs,
        output_dir=str(out),
        # the cell's own cache: built (and timed) in this run, never another run's
        cache_dir=str(out / CACHE_FOLDER) if cell.epochs > 1 else None,
        **sizes,
    )


# --- training FLOPs ------------------------------------------------------------------------------------------
class FlopCounter:
    """Training FLOPs of a cell's run from the exact batches it trains on: the same data stream (BatchStream with
    the run's batch, seed and balance) and tokenization as TrainingRun, each micro-batch padded to its longest
    example, the loss on its label tokens. Dataset, tokenizer and backbone shape are loaded once per bench."""

    def __init__(self, model: str):
        from ladder_kernels.planning.planner import load_config
        from ladder_kernels.train.backbones import load_tokenizer, resolve_model

        self.model_dir = resolve_model(model)
        self.config = load_config(self.model_dir)
        self.shape = ModelShape.of(self.config)
        self.tokenizer = load_tokenizer(self.model_dir)
        self._datasets: dict = {}
        self._lengths: dict = {}  # (training index, seq_len) -> (tokens, loss tokens)

    def epoch(self, cfg: FinetuneConfig) -> list[list[Batch]]:
        """Each optimizer step's micro-batches in the run's first pass over its data."""
        from ladder_kernels.train.data import BatchStream, encode_example, load_dataset

        key = (cfg.task, cfg.data, cfg.cot, cfg.arith_level)
        if key not in self._datasets:
            self._datasets[key] = load_dataset(*key)
        dataset = self._datasets[key]
        stream = BatchStream(dataset, cfg.batch_size * cfg.grad_accum, cfg.seed, cfg.balance)
        steps = []
        for step in range(cfg.steps_in_effect):
            indices = stream.indices(step // cfg.steps_per_batch)
            micro = []
            for m in range(cfg.grad_accum):
                lengths = []
                for i in indices[m * cfg.batch_size : (m + 1) * cfg.batch_size]:
                    if (i, cfg.seq_len) not in self._lengths:
                        ids, labels, _ = encode_example(
                            self.tokenizer, dataset.train[i], cfg.seq_len, add_eos=not dataset.is_classification
                        )
                        self._lengths[i, cfg.seq_len] = (len(ids), sum(t != -100 for t in labels[1:]))
                    lengths.append(self._lengths[i, cfg.seq_len])
                micro.append(Batch(len(lengths), max(n for n, _ in lengths), sum(k for _, k in lengths)))
            steps.append(micro)
        return steps

    def run(self, cfg: FinetuneConfig) -> int:
        ladder = None if cfg.method == "qlora" else ladder_config(cfg, self.config.num_hidden_layers, self.config)
        return run_flops(self.shape, cfg.method, self.epoch(cfg), cfg.epochs_in_effect, ladder)


# --- the cells -----------------------------------------------------------------------------------------------
def _row(cell: Cell, summary: dict, flops: int, run_dir: Path) -> dict:
    return {
        "method": cell.method,
        "budget": cell.budget,
        "epochs": cell.epochs,
        "seed": cell.seed,
        "steps": summary["steps"],
        "accuracy": summary["accuracy_after"],
        "accuracy_zero_shot": summary["accuracy_before"],
        "n_eval": summary["eval_examples"],
        "train_seconds": summary["train_seconds"],
        "seconds_per_step": summary["seconds_per_step"],
        "training_flops": flops,
        "final_loss": mean_tail(summary["loss_history"], LOSS_TAIL),
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "trainable_parameters": summary["trainable_parameters"],
        "dtype": summary["dtype"],
        "run_dir": str(run_dir),
    }


def run_cell(s: AccuracyBenchSettings, cell: Cell, zero_shot: dict, counter: FlopCounter) -> dict:
    """One finetune run (or its summary read back). Ladder, ladder-cache and xLadder all start at the backbone
    (the output mix starts at it), and every QLoRA cell at the same quantized backbone (LoRA's B starts at 0), so
    the zero-shot evaluation is done once per family (`zero_shot`)."""
    cfg = cell_config(s, cell)
    family = "qlora" if cell.method == "qlora" else "side"
    summary = finetune_cell(cfg, zero_shot.get(family), "bench --accuracy")
    shutil.rmtree(Path(cfg.output_dir) / CACHE_FOLDER, ignore_errors=True)  # the cache has served its run
    zero_shot.setdefault(family, summary["eval_before"])
    return _row(cell, summary, counter.run(cfg), Path(cfg.output_dir))


def run_accuracy_bench(s: AccuracyBenchSettings, write: bool = False, train: bool = True) -> list[dict]:
    """Every cell (a tqdm bar over them); returns one row per run. With `write`, the result files are rewritten
    after every cell; without `train`, only finished cells are read (the tables of a bench still running)."""
    from tqdm.auto import tqdm

    todo = [c for c in cells(s) if train or finished(s.runs_dir / c.name)]
    rows: list[dict] = []
    if not todo:
        return rows
    counter, zero_shot = FlopCounter(s.model), {}
    for cell in tqdm(todo, desc="bench --accuracy", unit="cell", dynamic_ncols=True):
        rows.append(run_cell(s, cell, zero_shot, counter))
        if write:
            write_accuracy_results(rows, s.out_dir, s.tag, s.command)
    return rows


# --- the compute-scaling fit ---------------------------------------------------------------------------------
def fit_slopes(rows: list[dict]) -> list[dict]:
    """Per method: log(final loss) = slope * log(FLOPs) + intercept, least squares over its runs (natural logs).
    A method with fewer than 2 budgets (or a non-positive loss) gets slope None and a note saying why."""
    fits = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        points = [(float(r["training_flops"]), r["final_loss"]) for r in rs]
        budgets = {int(r["budget"]) for r in rs}
        fit = {"method": method, "runs": len(rs), "budgets": len(budgets), "slope": None, "intercept": None}
        if len(budgets) < 2:
            fit["note"] = f"{method}: fewer than 2 budgets ({len(budgets)}), no slope fitted"
        elif any(loss is None or not float(loss) > 0 for _, loss in points):
            fit["note"] = f"{method}: a run has no finite positive training loss, no slope fitted"
        else:
            xs = [math.log(f) for f, _ in points]
            ys = [math.log(float(loss)) for _, loss in points]
            mx, my = statistics.mean(xs), statistics.mean(ys)
            fit["slope"] = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            fit["intercept"] = my - fit["slope"] * mx
            fit["note"] = ""
        fits.append(fit)
    return fits


# --- results -------------------------------------------------------------------------------------------------
def aggregate(rows: list[dict]) -> list[dict]:
    """Per (method, budget): means over seeds (accuracy also its sample standard deviation)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], int(r["budget"])), []).append(r)
    order = {m: i for i, m in enumerate(ACCURACY_METHODS)}
    out = []
    for (method, budget), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        acc = [float(r["accuracy"]) for r in rs]
        mean = lambda key: statistics.mean(float(r[key]) for r in rs)  # noqa: E731
        losses = [float(r["final_loss"]) for r in rs if r["final_loss"] is not None]
        out.append(
            {
                "method": method,
                "budget": budget,
                "epochs": int(rs[0]["epochs"]),
                "seeds": len(rs),
                "accuracy": statistics.mean(acc),
                "std": statistics.stdev(acc) if len(acc) > 1 else None,
                "zero_shot": float(rs[0]["accuracy_zero_shot"]),
                "steps": mean("steps"),
                "train_seconds": mean("train_seconds"),
                "flops": mean("training_flops"),
                "loss": statistics.mean(losses) if losses else None,
                "peak": mean("peak_memory_bytes"),
                "params": mean("trainable_parameters"),
                "n_eval": int(rs[0]["n_eval"]),
            }
        )
    return out


def markdown(rows: list[dict], command: str) -> str:
    groups = aggregate(rows)
    lines = [
        f"# Held-out accuracy against training compute on `{TASK}`",
        "",
        f"Command: `{command}`",
        "",
        "Held-out accuracy (mean over seeds ± sample standard deviation) per method and budget (optimizer steps of "
        "one pass over the data; ladder-cache makes `epochs` passes over the same examples from the backbone-state "
        "cache). Train s: measured training wall time (the caching pass included). FLOPs: counted analytically "
        "(ladder_kernels/planning/flops.py: backbone forward, side forward and backward, QLoRA's backward through "
        f"the backbone). Final loss: the mean training loss of the last {LOSS_TAIL} steps.",
        "",
        "| method | budget | epochs | seeds | accuracy | zero-shot | steps | train s | TFLOPs | final loss | "
        "peak memory | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        spread = f" ± {100 * g['std']:.1f}" if g["std"] is not None else ""
        loss = "-" if g["loss"] is None else f"{g['loss']:.3f}"
        lines.append(
            f"| {g['method']} | {g['budget']} | {g['epochs']} | {g['seeds']} | {100 * g['accuracy']:.1f}%{spread} | "
            f"{100 * g['zero_shot']:.1f}% | {g['steps']:.0f} | {g['train_seconds']:.1f} | {g['flops'] / 1e12:.4g} | "
            f"{loss} | {g['peak'] / 2**30:.2f} GiB | {g['params'] / 1e6:.3f} M |"
        )
    lines += [
        "",
        "Compute scaling: least-squares fit of ln(final loss) = slope × ln(FLOPs) + intercept over each method's runs.",
        "",
        "| method | runs | budgets | slope | intercept |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for f in fit_slopes(rows):
        slope = "-" if f["slope"] is None else f"{f['slope']:.3f}"
        intercept = "-" if f["intercept"] is None else f"{f['intercept']:.3f}"
        lines.append(f"| {f['method']} | {f['runs']} | {f['budgets']} | {slope} | {intercept} |")
        notes += [f["note"]] if f["note"] else []
    n_eval = groups[0]["n_eval"] if groups else 0
    noise = 100 * (0.25 / max(1, n_eval)) ** 0.5
    lines += ["", *[f"Note: {n}." for n in notes]]
    lines += [f"Held-out examples per run: {n_eval} (binomial sampling noise up to ±{noise:.1f} points per run).", ""]
    return "\n".join(lines)


def plot_png(rows: list[dict]) -> bytes:
    """Three panels: accuracy vs wall time, accuracy vs FLOPs, final loss vs FLOPs (log-log, fitted lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    colours = dict(zip(ACCURACY_METHODS, ("tab:blue", "tab:cyan", "tab:green", "tab:red")))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    groups = aggregate(rows)
    for method in dict.fromkeys(g["method"] for g in groups):
        gs = [g for g in groups if g["method"] == method]
        style = dict(color=colours[method], marker="o", label=method)
        yerr = [0 if g["std"] is None else 100 * g["std"] for g in gs]
        acc = [100 * g["accuracy"] for g in gs]
        axes[0].errorbar([g["train_seconds"] for g in gs], acc, yerr=yerr, capsize=3, **style)
        axes[1].errorbar([g["flops"] for g in gs], acc, yerr=yerr, capsize=3, **style)
        rs = [r for r in rows if r["method"] == method and r["final_loss"] is not None]
        axes[2].scatter([float(r["training_flops"]) for r in rs], [float(r["final_loss"]) for r in rs], **style)
    for f in fit_slopes(rows):
        if f["slope"] is not None:
            xs = sorted(float(r["training_flops"]) for r in rows if r["method"] == f["method"])
            xs = [xs[0], xs[-1]]
            ys = [math.exp(f["intercept"]) * x ** f["slope"] for x in xs]
            axes[2].plot(xs, ys, color=colours[f["method"]], linestyle="--", label=f"slope {f['slope']:.3f}")
    axes[0].set(xlabel="training wall time (s)", ylabel="held-out accuracy (%)", title="accuracy vs wall time")
    axes[1].set(xlabel="training FLOPs", ylabel="held-out accuracy (%)", title="accuracy vs FLOPs", xscale="log")
    axes[2].set(xlabel="training FLOPs", ylabel="final training loss", title="loss vs FLOPs (log-log)")
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.xaxis.set_minor_formatter(NullFormatter())  # log axes: decade labels only
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure_png(fig, dpi=110)


def write_accuracy_results(rows: list[dict], out_dir: Path, tag: str, command: str) -> list[Path]:
    return write_bench_files(
        out_dir, f"accuracy_{tag}", runs_csv_text(rows, CSV_FIELDS, command), markdown(rows, command), plot_png(rows)
    )
