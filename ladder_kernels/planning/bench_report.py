"""What `ladder-kernels bench` writes (ladder_kernels.planning.bench measures): the long-format CSV, the markdown
table with the ratios to QLoRA per cell, the agreement with an earlier run, and the two plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

from ladder_kernels.defaults import METHODS
from ladder_kernels.io import write_bytes_atomic, write_text_atomic
from ladder_kernels.planning.bench import REFERENCE

__all__ = [
    "CSV_FIELDS",
    "csv_text",
    "markdown_table",
    "agreement",
    "agreement_markdown",
    "plot_results",
    "write_results",
    "read_results",
]

GIB = 2**30
CARD_LINES_GIB = (12, 24)
CSV_FIELDS = ("method", "model", "seq_len", "batch", "device", "metric", "value", "versions", "timestamp", "command")
# qlora-lk shares qlora's memory exactly: dashed so that both stay visible
METHOD_STYLE = {
    "ladder": dict(marker="o"),
    "xladder": dict(marker="s"),
    "qlora": dict(marker="^"),
    "qlora-ckpt": dict(marker="v"),
    "qlora-lk": dict(marker="x", linestyle="--"),
}


def csv_text(rows: list[dict], fields: tuple = CSV_FIELDS, lineterminator: str = "\r\n") -> str:
    """Rows as CSV text: by default the long-format rows of `bench` (CSV_FIELDS)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def long_rows(results: dict[str, dict], **columns) -> list[dict]:
    """CSV_FIELDS rows, one per method and metric, of results[method][metric] = value; `columns` are the fields every
    row shares (model, seq_len, batch, device, versions, timestamp, command)."""
    return [dict(method=m, **columns, metric=k, value=v) for m, metrics in results.items() for k, v in metrics.items()]


def read_results(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


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


def speed_ratio(by_method: dict, method: str) -> Optional[float]:
    """The cell's speed of `method` relative to QLoRA's (> 1: faster): interleaved, the median over rounds of the
    ratio within a round (`speed_vs_qlora`); otherwise the ratio of the median tokens/s."""
    ref, m = by_method.get(REFERENCE, {}), by_method.get(method, {})
    if method == REFERENCE and ref:
        return 1.0
    if "speed_vs_qlora" in m:
        return m["speed_vs_qlora"]
    if not ref.get("tokens_per_s") or not m.get("tokens_per_s"):
        return None
    return m["tokens_per_s"] / ref["tokens_per_s"]


def _header_lines(rows: list[dict], mem_metric: str) -> list[str]:
    device = rows[0]["device"]
    first = rows[0]
    steps = {int(float(r["value"])) for r in rows if r["metric"] == "timed_steps"}
    interleaved = any(r["metric"] == "interleaved" and float(r["value"]) for r in rows)
    lines = [
        f"# End-to-end training step: {device}",
        "",
        f"Command: `{first['command']}`  ",
        f"Versions: {first['versions']}  ",
        f"Run: {first['timestamp']}",
        "",
        "Peak = "
        f"{'torch.cuda.max_memory_allocated' if device == 'cuda' else 'tracked tensor memory (PeakMemoryTracker)'}, "
        "one step, weights and optimizer state included; ×qlora = ratio to qlora in the same cell (memory: lower is "
        "better; speed: higher is better; interleaved, the median over rounds of the ratio within each round).",
        f"Speed: median over {'/'.join(str(s) for s in sorted(steps)) or '?'} timed steps per method after the "
        "warm-up, min–max beside it; "
        + (
            "the methods of a cell take turns within each round (the first method rotates), so a busy machine slows "
            "them alike."
            if interleaved
            else "each method timed alone, one after the other."
        ),
        "",
    ]
    loads = [float(r["value"]) for r in rows if r["metric"] == "load_avg"]
    if loads:
        lines[-1:-1] = [f"1-minute load average per core after the cells: {min(loads):.2f}–{max(loads):.2f}."]
    return lines


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no results)\n"
    device = rows[0]["device"]
    mem_metric = _memory_metric(device)
    lines = _header_lines(rows, mem_metric)
    table = _pivot(rows)
    with_rss = any("rss_peak_bytes" in m for by in table.values() for m in by.values())
    header = (
        "| model | batch | seq_len | method | peak GiB | ×qlora mem | "
        + ("RSS GiB | " if with_rss else "")
        + "planned GiB | tokens/s median (min–max) | ×qlora speed | loss first → last |"
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for (model, batch, seq_len), by_method in sorted(table.items()):
        ref = by_method.get(REFERENCE, {})
        for method, m in by_method.items():
            if m.get("oom"):
                cells = ["OOM"] * (header.count("|") - 5)
            else:
                mem, speed, ratio = m.get(mem_metric), m.get("tokens_per_s"), speed_ratio(by_method, method)
                cells = [
                    f"{mem / GIB:.3f}" if mem is not None else "-",
                    f"{mem / ref[mem_metric]:.2f}" if mem is not None and ref.get(mem_metric) else "-",
                ]
                if with_rss:
                    cells.append(f"{m['rss_peak_bytes'] / GIB:.2f}" if "rss_peak_bytes" in m else "-")
                spread = (
                    f" ({m['tokens_per_s_min']:.0f}–{m['tokens_per_s_max']:.0f})" if "tokens_per_s_min" in m else ""
                )
                cells += [
                    f"{m['planned_peak_bytes'] / GIB:.3f}" if "planned_peak_bytes" in m else "-",
                    f"{speed:.0f}{spread}" if speed is not None else "-",
                    f"{ratio:.2f}" if ratio is not None else "-",
                    f"{m['loss_first']:.3f} → {m['loss_last']:.3f}" if "loss_last" in m else "-",
                ]
            lines.append(f"| {model} | {batch} | {seq_len} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def agreement(rows: list[dict], earlier: list[dict]) -> list[dict]:
    """Per cell present in both runs (QLoRA itself aside): ×qlora speed in each and their relative difference
    |this / earlier - 1|."""
    now, before = _pivot(rows), _pivot(earlier)
    out = []
    for cell in sorted(set(now) & set(before)):
        for method in now[cell]:
            if method == REFERENCE:
                continue
            a, b = speed_ratio(now[cell], method), speed_ratio(before[cell], method)
            if a is not None and b is not None:
                out.append(dict(cell=cell, method=method, ratio=a, earlier=b, difference=abs(a / b - 1)))
    return out


def agreement_markdown(rows: list[dict], earlier: list[dict], earlier_name: str, tolerance: float = 0.2) -> str:
    """The agreement of this run's speed ratios with an earlier run's, as a markdown section."""
    pairs = agreement(rows, earlier)
    if not pairs:
        return f"\n## Agreement with {earlier_name}\n\nNo cell in common.\n"
    worst = max(p["difference"] for p in pairs)
    stamp = earlier[0]["timestamp"] if earlier else "?"
    lines = [
        "",
        f"## Agreement with {earlier_name} (run {stamp})",
        "",
        f"×qlora speed per cell in both runs; largest difference {worst:.1%} "
        f"({'within' if worst <= tolerance else 'NOT within'} {tolerance:.0%} in every cell).",
        "",
        "| model | batch | seq_len | method | ×qlora speed, this run | earlier run | difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        model, batch, seq_len = p["cell"]
        lines.append(
            f"| {model} | {batch} | {seq_len} | {p['method']} | {p['ratio']:.2f} | {p['earlier']:.2f} | "
            f"{p['difference']:.1%} |"
        )
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
        (throughput_png, "tokens_per_s", "tokens / s (median; bars: min–max)", False),
    ):
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
        for ax, (model, batch) in zip(axes[0], models):
            present = {meth for (mo, b, _), by in table.items() if (mo, b) == (model, batch) for meth in by}
            for method in [m for m in METHODS if m in present]:
                points = sorted(
                    (t, by[method])
                    for (mo, b, t), by in table.items()
                    if (mo, b) == (model, batch) and method in by and metric in by[method]
                )
                if not points:
                    continue
                xs = [t for t, _ in points]
                ys = [m[metric] / GIB if lines else m[metric] for _, m in points]
                if not lines and all(f"{metric}_min" in m for _, m in points):
                    low = [y - m[f"{metric}_min"] for y, (_, m) in zip(ys, points)]
                    high = [m[f"{metric}_max"] - y for y, (_, m) in zip(ys, points)]
                    ax.errorbar(xs, ys, yerr=[low, high], label=method, capsize=3, **METHOD_STYLE[method])
                else:
                    ax.plot(xs, ys, label=method, **METHOD_STYLE[method])
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


def write_results(rows: list[dict], out_dir: Path, tag: str, compare_with: Optional[Path] = None) -> list[Path]:
    """CSV, markdown (with the agreement with the run in the CSV `compare_with`, if given) and the two plots
    for `rows`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / f"e2e_{tag}.csv",
        out_dir / f"e2e_{tag}.md",
        out_dir / f"e2e_{tag}_memory.png",
        out_dir / f"e2e_{tag}_throughput.png",
    ]
    markdown = markdown_table(rows)
    if compare_with is not None:
        markdown += agreement_markdown(rows, read_results(compare_with), Path(compare_with).name)
    write_text_atomic(paths[0], csv_text(rows))
    write_text_atomic(paths[1], markdown)
    plot_results(rows, paths[2], paths[3])
    return paths
