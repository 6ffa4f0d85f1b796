"""The end of a run: the summary table (markdown), its JSON, and the loss-curve plot."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

from ladder_kernels.io import write_bytes_atomic, write_text_atomic
from ladder_kernels.train.run_dir import LOSS_PNG, SUMMARY_JSON, SUMMARY_MD
from ladder_kernels.units import format_gib


def finite_mean(values: Sequence[float]) -> float | None:
    """The mean of the finite values (a step skipped by --skip-nonfinite logs its NaN/Inf loss); None if none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def mean_tail(history: list[float], n: int = 20) -> float | None:
    return finite_mean(history[-n:])


def summary_table(s: dict) -> str:
    """The final summary as a markdown table."""
    gain = 100 * (s["accuracy_after"] - s["accuracy_before"])
    metric = s.get("metric") or ("accuracy" if s["task"] == "sentiment" else "exact match")
    processes = f" over {s['processes']} processes" if s.get("processes", 1) > 1 else ""
    matmul = f", 4-bit matmuls in {s['matmul_dtype']}" if s.get("matmul_dtype", s["dtype"]) != s["dtype"] else ""
    rows = [
        (
            "method",
            f"{s['method']} ({s['dtype']}{matmul}, lr {s['lr']:g}, batch {s['batch_size']}x{s['grad_accum']}"
            f"{processes}, seq-len {s['seq_len']}, balance {s['config']['balance']:g})",
        ),
        ("model / task", f"{Path(s['model_dir']).name} / {s['task']} ({s['data']}, {s['train_examples']} train)"),
        (f"held-out {metric} before (zero-shot)", f"{s['accuracy_before']:.1%} on {s['eval_examples']}"),
        (f"held-out {metric} after", f"{s['accuracy_after']:.1%} ({gain:+.1f} points)"),
    ]
    if "predicted" in s["eval_after"]:
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
        rows.append(
            (
                "predictions before -> after",
                f"{fmt(s['eval_before']['predicted'])} -> {fmt(s['eval_after']['predicted'])}",
            )
        )
    if "mean_generated_tokens" in s["eval_after"]:
        ev = s["eval_after"]
        rows.append(
            ("generated tokens per answer, eval time", f"{ev['mean_generated_tokens']:.1f}, {ev['eval_seconds']:.0f} s")
        )
    rows += [
        (
            "steps",
            f"{s['steps']} of {s['steps_planned']}"
            + (f" (stopped: {s['stopped_early']})" if s["stopped_early"] else "")
            + (f"; {len(s['skipped_steps'])} skipped for a non-finite loss/gradient" if s.get("skipped_steps") else ""),
        ),
        ("train wall time", f"{s['train_seconds']:.0f} s ({s['seconds_per_step']:.2f} s/step)"),
        ("largest loss spike", _spike_cell(s.get("largest_loss_spike"))),
        *_cache_rows(s),
        ("tokens/s", f"{s['tokens_per_second']:.0f}"),
        ("peak memory", f"{format_gib(s['peak_memory_bytes'])} ({s['peak_memory_kind']})"),
    ]
    if s.get("memory_budget"):
        b = s["memory_budget"]
        rows.append(
            (
                "memory budget (--gpu-memory)",
                f"{format_gib(b['budget_bytes'])}: planned peak {format_gib(b['planned_peak_bytes'])}, needs "
                f"{format_gib(b['planned_required_bytes'])}; {b['settings']}",
            )
        )
    rows += [
        ("trainable parameters", f"{s['trainable_parameters'] / 1e6:.2f} M"),
        ("adapter size", f"{s['adapter_bytes'] / 1e6:.1f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'':{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _cache_rows(s: dict) -> list[tuple[str, str]]:
    """The backbone-state cache of --epochs > 1: its size, whether it was reused, the backbone time it saved."""
    c = s.get("state_cache")
    if not c:
        return []
    made = "reused" if c["reused"] else f"built in {c['build_seconds']:.0f} s (counted in the train wall time)"
    return [
        (
            f"backbone-state cache ({s['epochs']} epochs)",
            f"{c['bytes'] / 2**20:.1f} MiB, {c['bytes_per_example'] / 2**10:.1f} KiB per example ({c['examples']} "
            f"examples, {c['storage']}), {made}; {c['replayed_batches']} batches trained from it, about "
            f"{c['backbone_seconds_saved']:.0f} s of backbone saved",
        )
    ]


def _spike_cell(spike: dict | None) -> str:
    if spike is None:
        return "-"
    return (
        f"{spike['ratio']:.2f}x the mean of the steps before it, at step {spike['step']} "
        f"(loss {spike['loss']:.3g} vs {spike['running_mean']:.3g})"
    )


def smoothed(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so that early values are not pulled towards zero. A non-finite
    value (a skipped step) leaves the average as it was."""
    out, average, t = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            t += 1
            average = beta * average + (1 - beta) * v
        out.append(average / (1 - beta**t) if t else math.nan)
    return out


def plot_loss_curve(history: list[float], path: Path, title: str) -> None:
    """Per-step loss and its smoothed curve, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(history) + 1)
    ax.plot(steps, history, color="tab:blue", alpha=0.3, linewidth=1, label="loss per step")
    ax.plot(steps, smoothed(history), color="tab:blue", linewidth=2, label="smoothed (EMA 0.9, bias-corrected)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def write_reports(out: Path, summary: dict, history: list[float]) -> None:
    """Print the summary table; write summary.json, summary.md and loss_curve.png into the run folder."""
    table = summary_table(summary)
    print("\n" + table)
    write_text_atomic(out / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / SUMMARY_MD, f"```\n{summary['command']}\n```\n\n{table}\n")
    plot_loss_curve(
        history,
        out / LOSS_PNG,
        f"{summary['method']} on {summary['task']}: held-out accuracy "
        f"{summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%}",
    )
    print(f"\nrun folder: {out} (adapter/, {SUMMARY_MD}, {LOSS_PNG})")
