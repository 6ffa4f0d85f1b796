"""`ladder-kernels finetune`'s run: train a Ladder / xLadder side network (or a QLoRA baseline) on a task,
with zero-shot and final held-out evaluation, atomic checkpoints that resume bit-exactly, a summary table and
a loss-curve plot (the run folder: train/run_dir.py).

Under torchrun / accelerate launch (WORLD_SIZE > 1) the run is data-parallel (train/distributed.py):
--batch-size is the global micro-batch, so N processes give one process's results, and rank 0 alone
evaluates, logs and writes the run folder.

A NaN/Inf loss or gradient norm stops the run before its optimizer step (nothing of that step is saved), or
with --skip-nonfinite skips the step. Out of GPU memory stops with the settings to lower and the planner's
prediction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ladder_kernels.defaults import dtype_from_name
from ladder_kernels.errors import ConfigError, ModelError, RunDirError, TrainingError
from ladder_kernels.io import write_text_atomic
from ladder_kernels.nn.ladder import LadderModel
from ladder_kernels.nn.nf4_linear import set_matmul_dtype_
from ladder_kernels.nn.step_sizes import param_groups
from ladder_kernels.planning.memory import peak_memory_bytes, reset_peak_memory
from ladder_kernels.planning.planner import load_config
from ladder_kernels.train import distributed, state_cache
from ladder_kernels.train.backbones import check_causal_lm, load_backbone, load_tokenizer, resolve_model
from ladder_kernels.train.budget import fit_to_budget
from ladder_kernels.train.chat import check_chat_template
from ladder_kernels.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ladder_kernels.train.config import FinetuneConfig, ladder_config
from ladder_kernels.train.data import BatchStream, collate, encode_example, label_first_tokens, load_dataset
from ladder_kernels.train.distributed import all_sum, barrier, data_parallel, from_rank0, rank_and_world, token_weight
from ladder_kernels.train.evaluate import evaluate
from ladder_kernels.train.loss_watch import LossWatch
from ladder_kernels.train.report import finite_mean, mean_tail, write_reports
from ladder_kernels.train.run_dir import (
    ADAPTER,
    CHECKPOINT,
    RUN_CONFIG,
    check_output_dir,
    default_output_dir,
    save_adapter,
)
from ladder_kernels.units import format_gib

# What a run has done so far; a checkpoint holds these plus weights, optimizer, schedule, RNG and data order.
PROGRESS_KEYS = ("step", "history", "tokens", "train_seconds", "before", "skipped")


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor of step `step` (LambdaLR): linear warm-up over `warmup` steps, then a cosine
    decay to 0.1 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def build_model(cfg: FinetuneConfig, model_dir: Path):
    """The trainable model of `cfg.method` over the backbone in `model_dir`."""
    if cfg.method == "qlora":
        from ladder_kernels.planning.methods import make_qlora_model

        try:
            return make_qlora_model(model_dir, compute_dtype=cfg.torch_dtype, device=distributed.device())
        except (ValueError, KeyError, OSError) as exc:
            raise ModelError(f"--model: cannot build a QLoRA model from {model_dir}: {exc}") from None
    backbone = load_backbone(model_dir, cfg.torch_dtype).to(distributed.device())
    try:
        model = LadderModel(backbone, ladder_config(cfg, backbone.config.num_hidden_layers, backbone.config))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ModelError(f"--model: Ladder cannot wrap {type(backbone).__name__}: {exc}") from None
    set_matmul_dtype_(model.backbone, dtype_from_name(cfg.matmul_dtype_name))
    return model


class TrainingRun:
    """One fine-tuning run: prepared (all inputs checked) before anything is written to the output folder.

    In a process group (torchrun, see distributed_from_env) every rank builds the same run; rank 0 alone writes."""

    def __init__(self, cfg: FinetuneConfig, resume: bool = False, explicit=None):
        """`explicit`: the option names the user gave, which --gpu-memory never changes (default: those that differ
        from FinetuneConfig's defaults)."""
        cfg = dataclasses.replace(cfg)
        if cfg.output_dir is None:
            if resume:
                raise RunDirError("--resume needs --output-dir (the folder of the run to continue)")
            cfg.output_dir = default_output_dir(cfg)
        cfg.validate()
        self.rank, self.world_size = rank_and_world()
        if cfg.batch_size < self.world_size:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} is split across {self.world_size} processes: it must be at least "
                f"{self.world_size}"
            )
        self.cfg, self.resume, self.out = cfg, resume, Path(cfg.output_dir)
        self.command = cfg.command_line() + (" --resume" if resume else "")
        check_output_dir(self.out, resume)
        self.dataset = load_dataset(cfg.task, cfg.data, cfg.cot, cfg.arith_level)
        if cfg.n_eval > len(self.dataset.heldout) and self.rank == 0:
            print(
                f"note: --eval-samples {cfg.n_eval} > {len(self.dataset.heldout)} held-out examples; evaluating all "
                "of them",
                file=sys.stderr,
            )
        self.eval_set = self.dataset.heldout[: cfg.n_eval]
        # Rank 0 first: converting a .gguf into the model cache must not race. The barrier also means that every
        # rank has checked the output folder before rank 0 writes to it.
        if self.rank > 0:
            barrier(self.world_size)
        self.model_dir = resolve_model(cfg.model)
        if self.rank == 0:
            barrier(self.world_size)
        check_causal_lm(self.model_dir)
        self.budget = None  # --gpu-memory: the settings chosen by the planner (a resumed run keeps its saved ones)
        if cfg.gpu_memory is not None and not resume:
            self.budget = fit_to_budget(cfg, explicit, load_config(self.model_dir), self.world_size)
            if self.rank == 0:
                print("\n".join(self.budget.lines()), file=sys.stderr)
            self.cfg = cfg = self.budget.cfg
        self.tokenizer = load_tokenizer(self.model_dir)
        if self.dataset.chat:
            check_chat_template(self.tokenizer, cfg.model)
            self._encoded = self._encode_all()  # every row's length checked before anything is written
        if self.dataset.is_classification:
            label_first_tokens(self.tokenizer, self.dataset.labels, chat=self.dataset.chat)
        self.checkpoint = load_checkpoint(self.out / CHECKPOINT) if resume else None
        if self.checkpoint is not None and self.checkpoint["step"] >= cfg.total_steps:
            raise RunDirError(f"--resume: the run in {self.out} already finished its {cfg.total_steps} steps")
        torch.manual_seed(cfg.seed)  # the side network's (or LoRA's) initialisation
        random.seed(cfg.seed)
        self.model = build_model(cfg, self.model_dir)
        # a caller that already knows the zero-shot result may set it (every Ladder run's step 0 is the backbone)
        self.zero_shot: Optional[dict] = None

    def run(self, on_step: Callable[[int], None] | None = None) -> dict:
        """Train, evaluate, save; `on_step(done)` is called after each optimizer step (progress hooks, tests).
        Every rank returns rank 0's summary."""
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.rank == 0
        self.params = trainable_parameters(self.model)
        if main:
            print(
                f"trainable parameters: {sum(p.numel() for p in self.params.values()):,} ({cfg.method})",
                file=sys.stderr,
            )
        groups = param_groups(self.model, cfg.learning_rate, cfg.lr_rule_in_effect)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        schedule = warmup_cosine(cfg.warmup_in_effect, cfg.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.stream = BatchStream(self.dataset, cfg.batch_size * cfg.grad_accum, cfg.seed, cfg.balance)
        self._encoded: dict[int, tuple[list[int], list[int]]] = getattr(self, "_encoded", {})
        self._states: tuple = (None, [])  # --steps-per-batch, --epochs: (batch key, backbone outputs per micro-batch)
        self.saved_step: Optional[int] = None  # the step of the last checkpoint written or resumed from
        state = self._start() if self.checkpoint is None else self._restore(self.checkpoint)
        self.train_model = data_parallel(self.model, self.world_size)

        start_step, stop_reason = state["step"], None
        reset_peak_memory()
        session_start = time.perf_counter()
        # the backbone's one pass, or a reuse
        self.cache = state_cache.RunCache(self) if cfg.epochs_in_effect > 1 else None
        state["train_seconds"] += self.cache.built if self.cache else 0.0
        self.model.train()
        self.loss_watch = LossWatch(state["history"])
        with tqdm(
            total=cfg.total_steps,
            initial=start_step,
            desc=f"{cfg.method} {cfg.task}",
            unit="step",
            dynamic_ncols=True,
            disable=not main,
        ) as bar:
            while state["step"] < cfg.total_steps and stop_reason is None:
                self._guarded_step(state)
                bar.update(1)
                recent = finite_mean(state["history"][-20:])
                self.loss_watch.observe(state["history"])
                bar.set_postfix(
                    loss="nan" if recent is None else f"{recent:.3f}",
                    spike=self.loss_watch.postfix(),
                    tok_s=f"{state['tokens'] / state['train_seconds']:.0f}",
                    peak=format_gib(peak_memory_bytes()),
                    refresh=False,
                )
                step = state["step"]
                if (
                    cfg.max_minutes is not None
                    and time.perf_counter() - session_start > 60 * cfg.max_minutes
                    and step < cfg.total_steps
                ):
                    stop_reason = f"--max-minutes {cfg.max_minutes:g} reached at step {step} of {cfg.total_steps}"
                if cfg.max_minutes is not None:
                    stop_reason = from_rank0(
                        stop_reason, self.world_size
                    )  # the ranks' clocks differ: all stop where rank 0 does
                if main and (step % cfg.checkpoint_every == 0 or step == cfg.total_steps or stop_reason):
                    self._checkpoint(state)
                if on_step is not None:
                    on_step(step)
        self._states = (None, [])  # the last batch's backbone outputs are not needed for evaluation
        if self.cache is not None:
            self.cache.close()
        summary = None
        if main:
            peak = peak_memory_bytes()
            after = evaluate(
                self.model, self.tokenizer, self.dataset, self.eval_set, cfg.seq_len, self.eval_batch, "held-out eval"
            )
            adapter_bytes = save_adapter(self.model, cfg, self.dataset, self.out / ADAPTER)
            summary = self._summary(
                state,
                state["step"],
                start_step,
                peak,
                after,
                adapter_bytes,
                sum(p.numel() for p in self.params.values()),
                stop_reason,
            )
            write_reports(self.out, summary, state["history"])
        return from_rank0(summary, self.world_size)

    @property
    def eval_batch(self) -> int:
        return max(self.cfg.batch_size, 32)  # forward-only batches: bigger ones are cheaper per example on CPU

    def _start(self) -> dict:
        """A new run: its configuration on disk, then the zero-shot evaluation (rank 0; the others wait in DDP's
        setup)."""
        before = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(
                self.out / RUN_CONFIG,
                json.dumps(
                    {
                        "config": dataclasses.asdict(self.cfg.in_effect()),
                        "command": self.command,
                        "model_dir": str(self.model_dir),
                    },
                    indent=2,
                )
                + "\n",
            )
            before = self.zero_shot or evaluate(
                self.model,
                self.tokenizer,
                self.dataset,
                self.eval_set,
                self.cfg.seq_len,
                self.eval_batch,
                "zero-shot eval",
            )
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
            print(f"resuming {self.out} at step {state['step']} of {self.cfg.total_steps}", file=sys.stderr)
        return {
            "skipped": [],
            **{k: state[k] for k in PROGRESS_KEYS if k in state},
        }  # "skipped": older checkpoints lack it

    def _checkpoint(self, state: dict) -> None:
        save_checkpoint(
            self.out / CHECKPOINT,
            {
                **state,
                "trainable": {n: p.detach().cpu() for n, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "data": self.stream.state(state["step"]),
            },
        )
        self.saved_step = state["step"]

    def _rows(self, indices: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """Tokenized training examples, each encoded once."""
        for i in indices:
            if i not in self._encoded:
                ids, labels, _ = encode_example(
                    self.tokenizer, self.dataset.train[i], self.cfg.seq_len, add_eos=not self.dataset.is_classification
                )
                self._encoded[i] = (ids, labels)
        return [self._encoded[i] for i in indices]

    def _encode_all(self) -> dict[int, tuple[list[int], list[int]]]:
        """Every training row encoded up front (chat rows: a conversation too long for --seq-len is an error naming
        its line, found before training starts)."""
        from tqdm.auto import tqdm

        self._encoded = {}
        self._rows(tqdm(range(len(self.dataset.train)), desc="encoding", unit="row", leave=False))
        return self._encoded

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
        cfg, dev = self.cfg, distributed.device()
        t0 = time.perf_counter()
        key, indices = self.cache.batch(state["step"]) if self.cache else self._batch(state["step"])
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, step_tokens = 0.0, 0
        for m in range(cfg.grad_accum):
            share = indices[m * cfg.batch_size : (m + 1) * cfg.batch_size][self.rank :: self.world_size]  # this rank's
            batch = collate(self._rows(share), self.tokenizer.pad_token_id)
            last = m == cfg.grad_accum - 1
            # DDP all-reduces the gradients in the last micro-batch's backward only
            with contextlib.nullcontext() if self.world_size == 1 or last else self.train_model.no_sync():
                states = self._backbone_states(key, m, share, batch["input_ids"].shape[1])
                loss = self.train_model(**{k: v.to(dev) for k, v in batch.items()}, **states).loss / cfg.grad_accum
                if self.world_size > 1:
                    loss = loss * token_weight(batch["labels"], self.world_size)
                loss.backward()
            step_loss += loss.item()
            step_tokens += int(batch["attention_mask"].sum())
        if self.world_size > 1:
            step_loss, step_tokens = all_sum(self.world_size, step_loss, step_tokens)
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

    def _batch(self, step: int) -> tuple[int, list[int]]:
        number = step // self.cfg.steps_per_batch
        return number, self.stream.indices(number)

    def _backbone_states(self, key, m: int, share: Sequence[int], width: int) -> dict:
        """{} (the backbone runs), or the backbone_states of micro-batch m of batch `key`: filled by its first step
        and replayed by the others (--steps-per-batch), or read from the cache (--epochs > 1)."""
        if self.cfg.steps_per_batch == 1 and self.cache is None:
            return {}
        if self._states[0] != key:  # a new batch
            self._states = (key, [None] * self.cfg.grad_accum)
            if self.cache is not None:
                self.cache.replayed += 1
        if self._states[1][m] is None:
            self._states[1][m] = self.cache.states(share, width, distributed.device()) if self.cache else {}
        return {"backbone_states": self._states[1][m]}

    def _nonfinite_message(self, step: int, loss: float, grad_norm: float) -> str:
        kept = (
            f"the last checkpoint ({self.out / CHECKPOINT}, step {self.saved_step}) is kept as it was"
            if self.saved_step is not None
            else "no checkpoint had been written yet"
        )
        return (
            f"step {step} of {self.cfg.total_steps}: the training loss is {loss} and the gradient norm {grad_norm}; "
            f"stopped before the optimizer step, {kept}. Lower --lr, or continue with --resume --skip-nonfinite to "
            "skip such steps"
        )

    def _out_of_memory_message(self, step: int) -> str:
        """One line: the settings that lower memory, and what the memory planner predicts for this run."""
        cfg = self.cfg
        per_rank = -(-cfg.batch_size // self.world_size)  # one process's share of the micro-batch
        where = (
            f" on a {torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30:.1f} GiB GPU"
            if torch.cuda.is_available()
            else ""
        )
        lower = (
            f"lower --batch-size {cfg.batch_size} (and raise --grad-accum {cfg.grad_accum} to keep the batch per "
            f"optimizer step) or --seq-len {cfg.seq_len}"
        )
        if cfg.method != "qlora":
            lower += (
                ", use --ladder-storage int8" if cfg.ladder_storage != "int8" else ""
            ) + f", or raise --reduction-factor {cfg.reduction_factor}"
        try:
            from ladder_kernels.planning.planner import plan

            options = {}
            if cfg.method != "qlora":
                lc = ladder_config(cfg, self.model.config.num_hidden_layers)
                options = {
                    k: getattr(lc, k) for k in ("reduction_factor", "ladder_layers", "xladder_depth", "ladder_storage")
                }
            p = plan(
                self.model_dir, cfg.method, seq_len=cfg.seq_len, batch_size=per_rank, dtype=cfg.torch_dtype, **options
            )
            predicted = (
                f"`ladder-kernels plan` predicts a peak of {p.peak_bytes / 2**30:.3g} GiB (a GPU needs "
                f"{p.required_bytes / 2**30:.3g} GiB) for {cfg.method} at --seq-len {cfg.seq_len}, batch {per_rank}"
            )
        except Exception as exc:  # noqa: BLE001 - the advice above stands without the prediction
            first_line = (str(exc).splitlines() or [""])[0]
            predicted = f"`ladder-kernels plan` could not predict this run ({type(exc).__name__}: {first_line})"
        return f"out of memory at step {step} of {cfg.total_steps}{where}: {lower}; {predicted}"

    def _summary(self, state, step, start_step, peak, after, adapter_bytes, n_trainable, stop_reason) -> dict:
        cfg, before = self.cfg, state["before"]
        seconds = state["train_seconds"]
        return {
            "command": self.command,
            "method": cfg.method,
            "model": cfg.model,
            "model_dir": str(self.model_dir),
            "task": cfg.task,
            "data": self.dataset.source,
            "data_format": "chat" if self.dataset.chat else "prompt/completion",
            "metric": "accuracy" if self.dataset.is_classification else "exact match",
            "train_examples": len(self.dataset.train),
            "eval_examples": after["n"],
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
            "eval_before": before,
            "eval_after": after,
            "steps": step,
            "steps_planned": cfg.total_steps,
            "epochs": cfg.epochs_in_effect,
            "state_cache": self.cache.summary() if self.cache else None,
            "resumed_from_step": start_step if self.resume else None,
            "stopped_early": stop_reason,
            "skipped_steps": state["skipped"],
            "processes": self.world_size,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "seq_len": cfg.seq_len,
            "lr": cfg.learning_rate,
            "dtype": cfg.dtype_name,
            "matmul_dtype": cfg.matmul_dtype_name,
            "train_seconds": seconds,
            "seconds_per_step": seconds / max(1, step),
            "tokens_per_second": state["tokens"] / seconds if seconds else 0.0,
            "tokens": state["tokens"],
            "peak_memory_bytes": peak,
            "memory_budget": self.budget.to_dict() if self.budget is not None else None,
            "peak_memory_kind": "cuda max_memory_allocated"
            if torch.cuda.is_available()
            else "process peak RSS during training",
            "trainable_parameters": n_trainable,
            "adapter_bytes": adapter_bytes,
            "final_loss": mean_tail(state["history"]),
            "loss_history": state["history"],
            "largest_loss_spike": None if self.loss_watch.largest is None else self.loss_watch.largest.to_dict(),
            "device": str(distributed.device()),
            "torch_threads": torch.get_num_threads(),
            "config": dataclasses.asdict(cfg),
        }
