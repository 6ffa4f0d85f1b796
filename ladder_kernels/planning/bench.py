"""End-to-end benchmark: Ladder, xLadder and QLoRA variants trained side by side on the same models, inputs
and machine (`ladder-kernels bench`, bench/bench_e2e.py).

Per cell (model × batch × seq_len) every method's model is built (`planning.methods.MethodTrainer`) and trained on
the same tokens for `warmup` + `steps` rounds. Interleaved (the default on CPU) every method takes one step per
round, the first method rotating, so that a machine whose load changes slows them alike and their ratios hold;
otherwise (the default on CUDA, where all methods' models may not fit at once) each method runs alone. Measured:
  step_s, step_s_min, step_s_max   median, fastest and slowest of the timed steps (no tracker attached)
  tokens_per_s (_min, _max)        batch × seq_len / those step times
  timed_steps, interleaved         how the step times were taken
  speed_vs_qlora      interleaved: the median over rounds of qlora's step time / this method's in the same round
  loss_first, loss_last   loss of the first and of the last step (the same tokens every step)
  cuda_peak_bytes     CUDA: torch.cuda.max_memory_allocated over one more step, less what was allocated before,
                      plus the method's own weights and optimizer state (other methods' models may be resident)
  tracked_peak_bytes  CPU: PeakMemoryTracker over one more step, weights and optimizer state counted
  rss_peak_bytes      CPU, methods run alone only: the process's resident set size, sampled every 5 ms
  planned_peak_bytes  optional (--plan): ladder_kernels.planning.planner's prediction for the cell (fake tensors)
  load_avg            the 1-minute load average per CPU core after the cell (>1: timings are contended)
A CUDA out-of-memory is recorded as `oom` = 1 for the method and the sweep goes on.

Outputs (ladder_kernels.planning.bench_report) in --out-dir, each written atomically: e2e_<tag>.csv (long format:
method, model, seq_len, batch, device, metric, value, versions, timestamp, command), e2e_<tag>.md (a table per
model with ratios to qlora; with --compare-with, the agreement of the speed ratios with an earlier run),
e2e_<tag>_memory.png (peak memory vs seq_len per method, 12 GB and 24 GB lines) and e2e_<tag>_throughput.png
(median tokens/s vs seq_len, min–max bars).
"""

from __future__ import annotations

import gc
import os
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from ladder_kernels.defaults import BENCH_STEPS, BENCH_WARMUP, METHODS
from ladder_kernels.planning.memory import PeakMemoryTracker, process_rss_bytes
from ladder_kernels.planning.methods import MethodTrainer

REFERENCE = "qlora"  # the method every other one is compared with

__all__ = [
    "BenchSettings",
    "run_bench",
    "TINY_CONFIGS",
    "resolve_bench_model",
    "measure_methods",
    "library_versions",
    "command_line",
]

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


@dataclass
class BenchSettings:
    methods: tuple = METHODS
    models: tuple = ("tiny-llama", "smollm2")
    seq_lens: tuple = (256, 512, 1024, 2048)
    batch_sizes: tuple = (1,)
    steps: int = BENCH_STEPS
    warmup: int = BENCH_WARMUP
    device: str = "auto"
    dtype: torch.dtype = torch.bfloat16
    out_dir: Path = Path("bench/results")
    tag: Optional[str] = None
    with_plan: bool = False
    interleave: Optional[bool] = None  # None: on CPU (see the module docstring)
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
        if self.interleave is None:
            self.interleave = self.device == "cpu"


def command_line() -> str:
    """This process's command, quoted for a shell (an empty argument stays ''), with the environment switches that
    change what it measures (thread counts included: they set every timing)."""
    names = (
        "LADDER_KERNELS_NO_CPU_EXT",
        "TRITON_INTERPRET",
        "CUDA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
        "OMP_WAIT_POLICY",
    )
    switches = [f"{k}={shlex.quote(os.environ[k])}" for k in names if k in os.environ]
    return " ".join(switches + [shlex.join(sys.argv)])


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


# --- one cell: every method over the same model and inputs ----------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _resident_bytes(trainer: MethodTrainer) -> int:
    """Bytes of what lives across steps: weights, buffers and optimizer state."""
    seen, total = set(), 0
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    tensors += [t for state in trainer.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _memory(trainer: MethodTrainer, ids: torch.Tensor, device: str) -> dict[str, float]:
    """Peak memory of one more step of `trainer`, weights and optimizer state included."""
    if device == "cuda":
        # other methods' models may be resident too: count this step's growth plus this method's own state
        _sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.step(ids)
        _sync(device)
        return {"cuda_peak_bytes": torch.cuda.max_memory_allocated() - before + _resident_bytes(trainer)}
    with PeakMemoryTracker() as mem:
        mem.track(trainer.model, trainer.optimizer)  # weights and AdamW state that live across steps
        trainer.step(ids)
    return {"tracked_peak_bytes": mem.peak_bytes}


def measure_methods(source, methods: tuple, ids: torch.Tensor, settings: BenchSettings) -> dict[str, dict]:
    """Build every method of `methods` over `source` and train them on `ids` in rounds: each round every method
    takes one step, the first method rotating from round to round, so that a machine whose load changes slows
    them alike. The first `warmup` rounds are untimed. Returns method -> metrics ({"oom": 1} for a method that
    ran out of GPU memory; the others go on)."""
    device = settings.device
    ids = ids.to(device)
    trainers, results = {}, {}
    for method in methods:
        try:
            trainers[method] = MethodTrainer(method, source, dtype=settings.dtype, device=device)
        except torch.OutOfMemoryError:
            results[method] = {"oom": 1}
            _free(device)
    times = {m: [] for m in trainers}
    losses = {m: [] for m in trainers}
    rss = RssSampler() if len(methods) == 1 and device == "cpu" else None  # RSS is per process: one method only
    if rss is not None:
        rss.__enter__()
    from tqdm.auto import tqdm

    for r in tqdm(range(settings.warmup + settings.steps), desc="rounds", unit="round", leave=False):
        order = [m for m in methods[r % len(methods) :] + methods[: r % len(methods)] if m in trainers]
        for method in order:
            try:
                _sync(device)
                start = time.perf_counter()
                losses[method].append(trainers[method].step(ids).item())  # .item() waits for the step
                if r >= settings.warmup:
                    times[method].append(time.perf_counter() - start)
            except torch.OutOfMemoryError:
                del trainers[method]
                results[method] = {"oom": 1}
                _free(device)
    if rss is not None:
        rss.__exit__(None, None, None)
    for method, trainer in trainers.items():
        step_s = statistics.median(times[method])
        results[method] = {
            "step_s": step_s,
            "step_s_min": min(times[method]),
            "step_s_max": max(times[method]),
            "tokens_per_s": ids.numel() / step_s,
            "tokens_per_s_min": ids.numel() / max(times[method]),
            "tokens_per_s_max": ids.numel() / min(times[method]),
            "timed_steps": len(times[method]),
            "interleaved": int(len(methods) > 1),
            "loss_first": losses[method][0],
            "loss_last": losses[method][-1],
            "load_avg": os.getloadavg()[0] / (os.cpu_count() or 1),  # >1: the CPU was shared while timing
            "oom": 0,
        }
        if rss is not None:
            results[method]["rss_peak_bytes"] = rss.peak
        try:
            results[method].update(_memory(trainer, ids, device))
        except torch.OutOfMemoryError:
            results[method]["oom"] = 1
    trainers.clear()
    _free(device)
    ref = times.get(REFERENCE)
    if ref and len(methods) > 1:
        # the ratio to qlora within each round, then the median over rounds: the two steps of a pair ran back to back,
        # so a load that changes between rounds cancels out of it
        for method, t in times.items():
            if results[method].get("oom") == 0 and len(t) == len(ref):
                results[method]["speed_vs_qlora"] = statistics.median(a / b for a, b in zip(ref, t))
    return results


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
    # interleaved: one group per cell holding every method; otherwise one group per method
    groups = [settings.methods] if settings.interleave else [(m,) for m in settings.methods]
    cells = [(r, b, t, g) for r in resolved for b in settings.batch_sizes for t in settings.seq_lens for g in groups]
    rows = []
    for (name, source, tokenizer), batch, seq_len, group in tqdm(cells, desc="bench", unit="cell"):
        tqdm.write(f"{name} batch={batch} seq_len={seq_len}: {', '.join(group)}")
        vocab = source.vocab_size if hasattr(source, "vocab_size") else tokenizer.vocab_size
        ids = token_batch(tokenizer, vocab, batch, seq_len)
        for method, metrics in measure_methods(source, group, ids, settings).items():
            if settings.with_plan:
                metrics["planned_peak_bytes"] = _planned_peak(source, method, seq_len, batch, settings.dtype)
            rows += [
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
                for metric, value in metrics.items()
            ]
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
