"""What the fine-tuning benches (`bench --cot`, `bench --accuracy`) share: a cell is one real `ladder-kernels
finetune` run (train.run.TrainingRun) in its own folder, read back from its summary.json once it has finished
(so an interrupted bench continues where it stopped); their per-run CSV and their three result files."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from ladder_kernels.errors import ConfigError
from ladder_kernels.io import write_bytes_atomic, write_text_atomic
from ladder_kernels.planning.bench import library_versions
from ladder_kernels.planning.bench_report import csv_text
from ladder_kernels.train.config import RESUMABLE_CHANGES, FinetuneConfig, flag
from ladder_kernels.train.run_dir import SUMMARY_JSON, saved_config


def finished(run_dir: Path) -> bool:
    """Whether the run in `run_dir` has written its summary."""
    return (Path(run_dir) / SUMMARY_JSON).is_file()


def finetune_cell(cfg: FinetuneConfig, zero_shot: Optional[dict] = None, label: str = "bench") -> dict:
    """The summary of the run `cfg` describes (cfg.output_dir is its folder): read back if it finished, else run
    (an interrupted run's folder is removed and the run started again). `zero_shot`: the backbone's zero-shot
    evaluation when the caller already has it (a Ladder run's step 0 is the backbone), so it is not repeated."""
    from ladder_kernels.train.run import TrainingRun

    out = Path(cfg.output_dir)
    if finished(out):
        saved, wanted = saved_config(out), cfg.in_effect()  # the saved config has its defaults filled in
        changed = [
            f"{flag(f.name)} {getattr(saved, f.name)!r} (this bench: {getattr(wanted, f.name)!r})"
            for f in dataclasses.fields(cfg)
            if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(wanted, f.name)
        ]
        if changed:  # a finished run of other settings must not stand in for this cell
            raise ConfigError(
                f"{label}: {out} holds a finished run with other settings: {', '.join(changed)}; "
                "give another --runs-dir or remove that folder"
            )
        return json.loads((out / SUMMARY_JSON).read_text(encoding="utf-8"))
    if out.exists():
        shutil.rmtree(out)
    print(f"{label}: {out.name}", file=sys.stderr)
    run = TrainingRun(cfg)
    run.zero_shot = zero_shot
    return run.run()


def runs_csv_text(rows: list[dict], fields: tuple, command: str) -> str:
    """One line per run: `fields`, then the library versions and the bench's command."""
    versions = library_versions()
    return csv_text(
        [{**row, "versions": versions, "command": command} for row in rows],
        fields=(*fields, "versions", "command"),
        lineterminator="\n",
    )


def figure_png(fig, dpi: int) -> bytes:
    """A matplotlib figure as PNG bytes (laid out tight), the figure closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def write_bench_files(out_dir: Path, stem: str, csv: str, markdown: str, png: bytes) -> list[Path]:
    """<stem>.csv, .md and .png in `out_dir`, each written atomically; their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "png")]
    write_text_atomic(paths[0], csv)
    write_text_atomic(paths[1], markdown)
    write_bytes_atomic(paths[2], png)
    return paths
