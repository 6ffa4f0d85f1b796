"""`ladder-kernels plan`: the peak memory of fine-tuning a model with each method, whether it fits a GPU, and the
longest context that does (ladder_kernels.planning.planner)."""

from __future__ import annotations

import argparse
import json
from typing import Optional

from ladder_kernels.defaults import (
    DEFAULT_LADDER_EVERY,
    DEFAULT_STEPS,
    DTYPE_ALIASES,
    DTYPES,
    LADDER_STORAGES,
    METHODS,
    PLAN_METHODS,
)
from ladder_kernels.errors import ConfigError
from ladder_kernels.nn.config import every_nth_layer
from ladder_kernels.planning.planner import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    MAX_CONTEXT_SEARCHED,
    load_config,
    model_name,
    plan,
    plan_with_max_seq_len,
    shipped_models,
)
from ladder_kernels.units import format_gib, parse_bytes


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="predict the peak GPU memory of fine-tuning a model, per method",
        description="Runs each method's real training step on fake tensors (no weights, no GPU) and "
        "prints peak memory, whether it fits --gpu-memory, and the longest context that fits.",
    )
    p.add_argument(
        "--model",
        default="llama-2-7b",
        help=f"a shipped config ({', '.join(shipped_models())}), a config.json or a checkpoint folder",
    )
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--gpu-memory", default="12GB", help="the GPU's memory, e.g. 12GB, 24GiB (GB = GiB = 2**30 bytes)")
    p.add_argument("--methods", default=",".join(PLAN_METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument(
        "--dtype", default="bf16", choices=sorted(DTYPES) + sorted(DTYPE_ALIASES), help="compute dtype (default bf16)"
    )
    p.add_argument(
        "--reduction-factor", type=int, default=None, help="Ladder side width = hidden / r (LadderConfig default 8)"
    )
    p.add_argument("--xladder-depth", type=int, default=None, help="δ for xladder (default: a quarter of the layers)")
    p.add_argument("--ladder-storage", choices=LADDER_STORAGES, default=None, help="storage of the kept ladder inputs")
    p.add_argument(
        "--ladder-every",
        type=int,
        default=DEFAULT_LADDER_EVERY,
        help=f"ladder: a side block on every N-th backbone layer from the top (default {DEFAULT_LADDER_EVERY}, as "
        "`ladder-kernels finetune`; 1: every layer)",
    )
    p.add_argument(
        "--side-checkpointing", action="store_true", help="ladder / xladder: recompute side blocks in backward"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS["ladder"],
        help="finetune --steps: the backbone-state cache of `finetune --epochs` holds steps x batch-size examples "
        f"(default {DEFAULT_STEPS['ladder']}, as finetune's for ladder and xladder)",
    )
    p.add_argument("--no-max-context", action="store_true", help="skip the longest-context search (faster)")
    p.add_argument("--json", action="store_true", help="print the plans as JSON instead of a table")
    p.set_defaults(func=run_plan_command)


def _ladder_options(args, method: str, config) -> dict:
    if method not in ("ladder", "xladder"):
        return {}
    opts = {
        "reduction_factor": args.reduction_factor,
        "ladder_storage": args.ladder_storage,
        "side_checkpointing": args.side_checkpointing or None,
    }
    if method == "xladder":
        opts["xladder_depth"] = args.xladder_depth
    else:
        opts["ladder_layers"] = every_nth_layer(config.num_hidden_layers, args.ladder_every)
    return {k: v for k, v in opts.items() if v is not None}


def _ordinal(n: int) -> str:
    return "" if n == 1 else f"{n}{ {2: 'nd', 3: 'rd'}.get(n, 'th') }"


def run_plan_command(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods: expected a comma-separated list from {', '.join(METHODS)}, got {args.methods!r}")
    if args.steps < 1:
        raise ConfigError(f"--steps must be an integer >= 1, got {args.steps}")
    if args.ladder_every < 1:
        raise ConfigError(f"--ladder-every must be an integer >= 1, got {args.ladder_every}")
    try:
        gpu_bytes = parse_bytes(args.gpu_memory)
        config = load_config(args.model)
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    rows = []
    for method in tqdm(methods, desc="planning", unit="method", leave=False):
        options = _ladder_options(args, method, config)
        if args.no_max_context:
            rows.append((plan(config, method, args.seq_len, args.batch_size, args.dtype, **options), None))
        else:
            rows.append(
                plan_with_max_seq_len(config, gpu_bytes, method, args.seq_len, args.batch_size, args.dtype, **options)
            )
    name = args.model if args.model in shipped_models() else model_name(config, args.model)
    if args.json:
        print(
            json.dumps(
                [
                    dict(
                        r.to_dict(),
                        fits=r.fits(gpu_bytes),
                        max_seq_len=longest,
                        cache_bytes=r.cache_bytes_per_example * args.steps * args.batch_size,
                    )
                    for r, longest in rows
                ],
                indent=2,
            )
        )
        return 0
    print(
        f"{name}, {args.seq_len} tokens x batch {args.batch_size}, {args.dtype}; GPU {_gib_cell(gpu_bytes)} GiB "
        f"(needs = peak x {1 + ALLOCATOR_SLACK:.2f} + {CUDA_CONTEXT_BYTES // 2**20} MiB CUDA context)"
    )
    if "ladder" in methods:
        print(
            f"side network of method ladder: a block on every {_ordinal(args.ladder_every)} backbone layer "
            f"(--ladder-every {args.ladder_every})"
        )
    header = [
        "method",
        "peak GiB",
        "needs GiB",
        "fits",
        "weights",
        "optim",
        "activations",
        "logits",
        "transient",
        "longest context",
    ]
    table = [header]
    for r, longest in rows:
        b = r.breakdown
        table.append(
            [
                r.method,
                _gib_cell(r.peak_bytes),
                _gib_cell(r.required_bytes),
                "yes" if r.fits(gpu_bytes) else "NO",
                _gib_cell(b["weights"]),
                _gib_cell(b["optimizer_state"]),
                _gib_cell(b["saved_activations"]),
                _gib_cell(b["logits_loss"]),
                _gib_cell(b["transient"]),
                _context_cell(longest, config),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if any(cell.endswith("*") for cell in (row[-1] for row in table[1:])):
        print(
            f"* beyond the model's max_position_embeddings ({config.max_position_embeddings}): fits in memory, "
            f"may not train well without RoPE scaling"
        )
    cached = [r for r, _ in rows if r.cache_bytes_per_example]
    if cached:
        examples = args.steps * args.batch_size
        print(
            f"backbone-state cache of `finetune --epochs` ({args.steps} steps x batch {args.batch_size} = {examples} "
            f"examples of at most {args.seq_len} tokens, on disk): "
            + "; ".join(
                f"{r.method} {r.cache_bytes_per_example / 2**20:.3g} MiB per example, "
                f"{_size(r.cache_bytes_per_example * examples)} in all"
                for r in cached
            )
        )
    return 0


def _context_cell(longest: Optional[int], config) -> str:
    if longest is None:
        return "-"
    if longest == 0:
        return "none"
    beyond = longest > (getattr(config, "max_position_embeddings", None) or longest)
    return f"{longest}{'*' if beyond else ''}" + (" (≥, search limit)" if longest >= MAX_CONTEXT_SEARCHED else "")


def _size(n: int) -> str:
    return format_gib(n) if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def _gib_cell(n: int) -> str:
    return format_gib(n, unit=False)
