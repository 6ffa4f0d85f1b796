"""One training step of Ladder against QLoRA on this CPU (issue 3's done-when, tightened by issue 14).

Model: Llama-shaped, 8 layers, hidden 512, intermediate 1408, 8 heads, vocab 32000, random weights;
1024 tokens, batch 1, bf16 compute (--dtype fp32: fp32, written to step_vs_qlora_cpu_fp32.*). Step = forward +
backward + AdamW step.
Methods: ladder (LadderConfig defaults), xladder, qlora (bitsandbytes NF4 double-quant + peft LoRA r=16 on
all linear layers, no gradient checkpointing), qlora-ckpt (the same with gradient checkpointing).
Peak = tracked tensor memory (PeakMemoryTracker) of one steady-state step, weights and optimizer state
included. Step time = median over timed rounds; the methods take turns within each round so that a busy
shared CPU slows them alike. Targets: ladder/qlora peak <= 0.5 (goal 0.35); step time <= 0.40 (goal 0.30, issue 14;
issue 3 asked <= 0.6).

    .venv/bin/python bench/bench_step_vs_qlora.py [--rounds 5] [--dtype bf16|fp32] [--out-dir bench/results]
writes bench/results/step_vs_qlora_cpu.csv and .md.
"""

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ladder_kernels.defaults import dtype_from_name
from ladder_kernels.io import write_text_atomic
from ladder_kernels.planning.bench import command_line, library_versions
from ladder_kernels.planning.bench_report import csv_text, long_rows
from ladder_kernels.planning.memory import PeakMemoryTracker
from ladder_kernels.planning.methods import MethodTrainer

METHODS = ("ladder", "xladder", "qlora", "qlora-ckpt")
MODEL = "llama-8x512"
SEQ_LEN, BATCH = 1024, 1
TARGETS = {"peak": (0.5, 0.35), "step_s": (0.40, 0.30)}  # ladder / qlora: (required, goal)


def issue3_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
    )


def measure(rounds: int, warmup: int, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    config = issue3_config()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN))
    trainers = {m: MethodTrainer(m, config, dtype=dtype, device="cpu") for m in METHODS}
    times = {m: [] for m in METHODS}
    losses = {m: [] for m in METHODS}
    for r in tqdm(range(warmup + rounds), desc="rounds", unit="round"):
        for method, trainer in trainers.items():
            start = time.perf_counter()
            losses[method].append(trainer.step(ids).item())
            if r >= warmup:
                times[method].append(time.perf_counter() - start)
    results = {}
    for method, trainer in trainers.items():
        with PeakMemoryTracker() as mem:
            mem.track(trainer.model, trainer.optimizer)
            trainer.step(ids)
        results[method] = {
            "peak": mem.peak_bytes,
            "step_s": statistics.median(times[method]),
            "step_s_min": min(times[method]),
            "loss_first": losses[method][0],
            "loss_last": losses[method][-1],
        }
    return results


def report(results: dict, command: str, dtype_name: str) -> tuple[str, str]:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    versions = library_versions()
    rows = long_rows(
        results,
        model=MODEL,
        seq_len=SEQ_LEN,
        batch=BATCH,
        device="cpu",
        versions=versions,
        timestamp=stamp,
        command=command,
    )
    ref = results["qlora"]
    lines = [
        "# One training step, Ladder vs QLoRA, CPU",
        "",
        f"Model: {MODEL} (Llama, 8 layers, hidden 512, intermediate 1408, 8 heads, vocab 32000, random weights), "
        f"{SEQ_LEN} tokens, batch {BATCH}, {dtype_name} compute; step = forward + backward + AdamW; the methods take "
        "turns within each round.  ",
        f"Command: `{command}`  ",
        f"Versions: {versions}  ",
        f"Run: {stamp}",
        "",
        "| method | peak MiB | ×qlora peak | step s (median) | ×qlora step | loss first → last |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in results.items():
        lines.append(
            f"| {m} | {r['peak'] / 2**20:.1f} | {r['peak'] / ref['peak']:.3f} | {r['step_s']:.2f} | "
            f"{r['step_s'] / ref['step_s']:.3f} | {r['loss_first']:.3f} → {r['loss_last']:.3f} |"
        )
    lines.append("")
    for metric, (required, goal) in TARGETS.items():
        ratio = results["ladder"][metric] / ref[metric]
        verdict = (
            "meets the goal" if ratio <= goal else ("meets the target" if ratio <= required else "MISSES the target")
        )
        lines.append(f"- ladder / qlora {metric}: {ratio:.3f} (target ≤ {required}, goal ≤ {goal}): {verdict}")
    return csv_text(rows), "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each method steps once per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "fp32"),
        help="compute dtype (default bf16; fp32 writes step_vs_qlora_cpu_fp32.*: CPUs without AVX-512 BF16 run bf16 "
        "GEMMs far slower)",
    )
    parser.add_argument("--tag", default="cpu", help="output name: step_vs_qlora_<tag>[_fp32].csv / .md (default cpu)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error(f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}")
    command = command_line()
    csv_body, markdown = report(measure(args.rounds, args.warmup, dtype_from_name(args.dtype)), command, args.dtype)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"step_vs_qlora_{args.tag}" + ("" if args.dtype == "bf16" else f"_{args.dtype}")
    write_text_atomic(out / f"{name}.csv", csv_body)
    write_text_atomic(out / f"{name}.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
