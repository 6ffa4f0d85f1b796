"""End-to-end benchmark: Ladder, xLadder and QLoRA variants trained side by side on the same models, inputs
and machine (`ladder-kernels bench`, bench/bench_e2e.py).

Per cell (model × method × batch × seq_len) a fresh model is built (`planning.methods.MethodTrainer`), trained for
`warmup` + `steps` steps on the same tokens, and measured:
  tokens_per_s        batch × seq_len / median step time of the timed steps (no tracker attached)
  step_s              that median step time
  loss_first, loss_last   loss of the first and of the last step (the same tokens every step)
  cuda_peak_bytes     CUDA: torch.cuda.max_memory_allocated over the steps (weights included)
  tracked_peak_bytes  CPU: PeakMemoryTracker over one more step, weights and optimizer state counted
  rss_peak_bytes      CPU: the process's resident set size, sampled every 5 ms during the steps
  planned_peak_bytes  optional (--plan): ladder_kernels.planning.planner's prediction for the cell (fake tensors)
  load_avg            the 1-minute load average per CPU core after the cell (>1: timings are contended)
A CUDA out-of-memory is recorded as `oom` = 1 for the cell and the sweep goes on.

Outputs in --out-dir (each written atomically): e2e_<tag>.csv (long format: method, model, seq_len, batch,
device, metric, value, versions, timestamp, command), e2e_<tag>.md (a table per model with ratios to qlora),
e2e_<tag>_memory.png (peak memory vs seq_len per method, 12 GB and 24 GB lines) and
e2e_<tag>_throughput.png (tokens/s vs seq_len).
"""

from __future__ import annotations

import csv
import gc
import io
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from ladder_kernels.defaults import METHODS
from ladder_kernels.io import write_bytes_atomic, write_text_atomic
from ladder_kernels.planning.memory import PeakMemoryTracker, process_rss_bytes
from ladder_kernels.planning.methods import MethodTrainer

__all__ = [
    "BenchSettings",
    "run_bench",
    "TINY_CONFIGS",
    "resolve_bench_model",
    "write_results",
    "csv_text",
    "library_versions",
    "command_line",
    "CSV_FIELDS",
]

GIB = 2**30
CARD_LINES_GIB = (12, 24)
# Small Llama/Qwen2-shaped configs for CPU runs (dimensions multiples of bitsandbytes' blocksize 64)
TINY_CONFIGS = {
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=8192,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2",
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    # TinyLlama-1.1B's shape, random weights (GPU)
    "llama-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=8192,
    ),
}
EMBEDDED_ALIASES = ("smollm2", "embedded")
# qlora-lk shares qlora's memory exactly: dashed so that both stay visible
METHOD_STYLE = {
    "ladder": dict(marker="o"),
    "xladder": dict(marker="s"),
    "qlora": dict(marker="^"),
    "qlora-ckpt": dict(marker="v"),
    "qlora-lk": dict(marker="x", linestyle="--"),
}


@dataclass
class BenchSettings:
    methods: tuple = METHODS
    models: tuple = ("tiny-llama", "smollm2")
    seq_lens: tuple = (256, 512, 1024, 2048)
    batch_sizes: tuple = (1,)
    steps: int = 3
    warmup: int = 1
    device: str = "auto"
    dtype: torch.dtype = torch.bfloat16
    out_dir: Path = Path("bench/results")
    tag: Optional[str] = None
    with_plan: bool = False
    command: str = field(default_factory=lambda: command_line())

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"bench: methods must be from {METHODS}, got {list(self.methods)}")
        for name in ("seq_lens", "batch_sizes"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"bench: {name} must be positive ints, got {list(values)}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"bench: steps must be >= 1 and warmup >= 0, got steps={self.steps}, warmup={self.warmup}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda") or (self.device == "cuda" and not torch.cuda.is_available()):
            raise ValueError(f"bench: device must be 'auto', 'cpu' or 'cuda' (with a GPU present), got {self.device!r}")
        self.out_dir = Path(self.out_dir)
        self.tag = self.tag or self.device


def command_line() -> str:
    """This process's command, with the environment switches that change what it measures."""
    switches = [
        f"{k}={os.environ[k]}"
        for k in ("LADDER_KERNELS_NO_CPU_EXT", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
        if k in os.environ
    ]
    return " ".join(switches + [sys.argv[0]] + sys.argv[1:])


# --- models and inputs ---------------------------------------------------------------------------------------
def resolve_bench_model(spec: str):
    """(name, source, tokenizer-or-None) for a model spec: a TINY_CONFIGS name, smollm2/embedded, a config
    shipped with the planner (random weights), or a local checkpoint folder."""
    from transformers import AutoConfig

    from ladder_kernels.planning.planner import load_config, shipped_models

    if spec in TINY_CONFIGS:
        values = dict(TINY_CONFIGS[spec])
        return spec, AutoConfig.for_model(values.pop("model_type"), **values), None
    if spec in EMBEDDED_ALIASES or Path(spec).is_dir():
        from ladder_kernels.train.backbones import EMBEDDED_NAME, load_tokenizer, resolve_model

        folder = resolve_model("embedded" if spec in EMBEDDED_ALIASES else spec)
        name = EMBEDDED_NAME if spec in EMBEDDED_ALIASES else folder.name
        return name, folder, load_tokenizer(folder)
    if spec in shipped_models():
        return spec, load_config(spec), None
    raise ValueError(
        f"bench: model {spec!r} is none of {sorted(TINY_CONFIGS)}, smollm2, a shipped config "
        f"{shipped_models()} or a checkpoint folder"
    )


def token_batch(tokenizer, vocab_size: int, batch: int, seq_len: int) -> torch.Tensor:
    """The inputs every method trains on: embedded tweets tokenized back to back (real models), or a
    periodic token pattern a random model can learn (period 61)."""
    if tokenizer is None:
        base = (torch.arange(batch * seq_len) * 7919) % 61 + 3
        return (base % vocab_size).view(batch, seq_len)
    from ladder_kernels.train.data import load_embedded_sentiment

    text = "\n".join(t for t, _ in load_embedded_sentiment()[: batch * seq_len // 8 + 64])
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < batch * seq_len:
        ids = ids.repeat(batch * seq_len // ids.numel() + 1)
    return ids[: batch * seq_len].view(batch, seq_len).contiguous()


class RssSampler:
    """The process's largest RSS while active, sampled every `interval` seconds by a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, process_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = process_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, process_rss_bytes())


# --- one cell ------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_cell(source, method: str, ids: torch.Tensor, settings: BenchSettings) -> dict[str, float]:
    """Build `method` over `source`, train warmup + steps steps on `ids`; the cell's metrics."""
    device = settings.device
    ids = ids.to(device)
    trainer = MethodTrainer(method, source, dtype=settings.dtype, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    with RssSampler() as rss:
        for i in range(settings.warmup + settings.steps):
            _sync(device)
            start = time.perf_counter()
            losses.append(trainer.step(ids).item())  # .item() waits for the step
            if i >= settings.warmup:
                times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    metrics = {
        "step_s": step_s,
        "tokens_per_s": ids.numel() / step_s,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "load_avg": os.getloadavg()[0] / (os.cpu_count() or 1),
    }  # >1: the CPU was shared while timing
    if device == "cuda":
        metrics["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        metrics["rss_peak_bytes"] = rss.peak
        with PeakMemoryTracker() as mem:
            mem.track(trainer.model, trainer.optimizer)  # weights and AdamW state that live across steps
            trainer.step(ids)
        metrics["tracked_peak_bytes"] = mem.peak_bytes
    del trainer
    return metrics


def _planned_peak(source, method: str, seq_len: int, batch: int, dtype: torch.dtype) -> int:
    from ladder_kernels.planning.planner import load_config, plan

    config = source if not isinstance(source, (str, os.PathLike)) else load_config(source)
    return plan(config, method, seq_len=seq_len, batch_size=batch, dtype=dtype).peak_bytes


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_bench(settings: BenchSettings) -> list[dict]:
    """Every cell of the sweep, in long format rows (see the module docstring)."""
    from tqdm.auto import tqdm

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    versions = library_versions()
    resolved = [resolve_bench_model(spec) for spec in settings.models]
    cells = [
        (r, b, t, m)
        for r in resolved
        for b in settings.batch_sizes
        for t in settings.seq_lens
        for m in settings.methods
    ]
    rows = []
    for (name, source, tokenizer), batch, seq_len, method in tqdm(cells, desc="bench", unit="cell"):
        tqdm.write(f"{name} {method} batch={batch} seq_len={seq_len}")
        vocab = source.vocab_size if hasattr(source, "vocab_size") else tokenizer.vocab_size
        ids = token_batch(tokenizer, vocab, batch, seq_len)
        try:
            metrics = measure_cell(source, method, ids, settings)
            metrics["oom"] = 0
        except torch.OutOfMemoryError:
            metrics = {"oom": 1}
        _free(settings.device)
        if settings.with_plan:
            metrics["planned_peak_bytes"] = _planned_peak(source, method, seq_len, batch, settings.dtype)
        for metric, value in metrics.items():
            rows.append(
                dict(
                    method=method,
                    model=name,
                    seq_len=seq_len,
                    batch=batch,
                    device=settings.device,
                    metric=metric,
                    value=value,
                    versions=versions,
                    timestamp=stamp,
                    command=settings.command,
                )
            )
    return rows


def library_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for package in ("torch", "transformers", "peft", "bitsandbytes", "triton"):
        try:
            parts.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            continue
    from ladder_kernels import __version__
    from ladder_kernels.backends import backend_info

    active = [name for name in ("triton", "cpu") if backend_info()[name]]
    return ";".join(parts + [f"ladder_kernels={__version__}", f"kernels={'+'.join(active) or 'torch-reference'}"])


# --- outputs -------------------------------------------------------------------------------------------------
CSV_FIELDS = ("method", "model", "seq_len", "batch", "device", "metric", "value", "versions", "timestamp", "command")


def csv_text(rows: list[dict]) -> str:
    """Long-format rows (CSV_FIELDS) as CSV text."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _pivot(rows: list[dict]) -> dict:
    """{(model, batch, seq_len): {method: {metric: value}}}"""
    table: dict = {}
    for r in rows:
        table.setdefault((r["model"], int(r["batch"]), int(r["seq_len"])), {}).setdefault(r["method"], {})[
            r["metric"]
        ] = float(r["value"])
    return table


def _memory_metric(device: str) -> str:
    return "cuda_peak_bytes" if device == "cuda" else "tracked_peak_bytes"


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no results)\n"
    device, command = rows[0]["device"], rows[0]["command"]
    mem_metric = _memory_metric(device)
    lines = [
        f"# End-to-end training step: {device}",
        "",
        f"Command: `{command}`  ",
        f"Versions: {rows[0]['versions']}  ",
        f"Run: {rows[0]['timestamp']}",
        "",
        "Peak = "
        f"{'torch.cuda.max_memory_allocated' if device == 'cuda' else 'tracked tensor memory (PeakMemoryTracker)'}; "
        "×qlora = ratio to qlora in the same cell (memory: lower is better; speed: higher is better).",
        "",
    ]
    loads = [float(r["value"]) for r in rows if r["metric"] == "load_avg"]
    if loads and max(loads) > 1:
        lines[-1:-1] = [
            f"Timings were taken on a shared machine (load up to {max(loads):.1f} per core): tokens/s "
            "are indicative only; the memory columns are not affected.",
            "",
        ]
    header = (
        "| model | batch | seq_len | method | peak GiB | ×qlora mem | "
        + ("" if device == "cuda" else "RSS GiB | ")
        + "planned GiB | tokens/s | ×qlora speed | loss first → last |"
    )
    table = _pivot(rows)
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for (model, batch, seq_len), by_method in sorted(table.items()):
        ref = by_method.get("qlora", {})
        for method, m in by_method.items():
            if m.get("oom"):
                cells = ["OOM"] * (7 if device == "cuda" else 8)
            else:
                mem, speed = m.get(mem_metric), m.get("tokens_per_s")
                cells = [
                    f"{mem / GIB:.3f}" if mem is not None else "-",
                    f"{mem / ref[mem_metric]:.2f}" if mem is not None and ref.get(mem_metric) else "-",
                ]
                if device != "cuda":
                    cells.append(f"{m['rss_peak_bytes'] / GIB:.2f}" if "rss_peak_bytes" in m else "-")
                cells += [
                    f"{m['planned_peak_bytes'] / GIB:.3f}" if "planned_peak_bytes" in m else "-",
                    f"{speed:.0f}" if speed is not None else "-",
                    f"{speed / ref['tokens_per_s']:.2f}" if speed is not None and ref.get("tokens_per_s") else "-",
                    f"{m['loss_first']:.3f} → {m['loss_last']:.3f}" if "loss_last" in m else "-",
                ]
            lines.append(f"| {model} | {batch} | {seq_len} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict], memory_png: Path, throughput_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = rows[0]["device"]
    mem_metric = _memory_metric(device)
    table = _pivot(rows)
    models = sorted({(model, batch) for model, batch, _ in table})
    for path, metric, ylabel, lines in (
        (memory_png, mem_metric, "peak memory (GiB)", True),
        (throughput_png, "tokens_per_s", "tokens / s", False),
    ):
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
        for ax, (model, batch) in zip(axes[0], models):
            present = {meth for (mo, b, _), by in table.items() if (mo, b) == (model, batch) for meth in by}
            for method in [m for m in METHODS if m in present]:
                points = sorted(
                    (t, by[method][metric])
                    for (mo, b, t), by in table.items()
                    if (mo, b) == (model, batch) and method in by and metric in by[method]
                )
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, [y / GIB if lines else y for y in ys], label=method, **METHOD_STYLE[method])
            if lines:
                # log scale: a tiny CPU model and the 12 / 24 GB cards fit on one axis
                ax.set_yscale("log")
                for gib in CARD_LINES_GIB:
                    ax.axhline(gib, color="gray", linestyle="--", linewidth=1)
                    ax.text(
                        1.0,
                        gib,
                        f"{gib} GB ",
                        transform=ax.get_yaxis_transform(),
                        ha="right",
                        va="bottom",
                        fontsize=8,
                        color="gray",
                    )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model}, batch {batch} ({device})")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, dpi=110, format="png")
        plt.close(fig)
        write_bytes_atomic(path, png.getvalue())


def write_results(rows: list[dict], out_dir: Path, tag: str) -> list[Path]:
    """CSV, markdown and the two plots for `rows`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / f"e2e_{tag}.csv",
        out_dir / f"e2e_{tag}.md",
        out_dir / f"e2e_{tag}_memory.png",
        out_dir / f"e2e_{tag}_throughput.png",
    ]
    write_text_atomic(paths[0], csv_text(rows))
    write_text_atomic(paths[1], markdown_table(rows))
    plot_results(rows, paths[2], paths[3])
    return paths


def read_results(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))
