"""Memory planner: does fine-tuning this model with this method fit my GPU? Answered without weights or a GPU.

`plan()` builds the method's real model (`planning.methods.MethodTrainer`: LadderModel, or the peft QLoRA model with
bitsandbytes 4-bit layers) under `FakeTensorMode` on CPU-device fakes and runs two real training steps
(forward, backward, AdamW step) with `PeakMemoryTracker`. Fakes carry shapes and dtypes only, so a 7B model
plans in seconds. The peak is taken over the training steps (the second one holds the optimizer state from
the start); building the model (a 16-bit copy quantized in place) is not part of it, as loading a checkpoint
with quantization never holds the whole 16-bit model.

What the peak counts: tensor storages, as `torch.cuda.max_memory_allocated` does (to within its 512-byte
rounding). What it does not: the CUDA context and cuBLAS/cuDNN workspaces, the caching allocator's unused
reserve (fragmentation), and scratch memory a kernel allocates outside the dispatcher. `MemoryPlan.fits`
adds a documented fixed margin for those: CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK × peak.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ladder_kernels.defaults import METHODS, dtype_from_name
from ladder_kernels.planning.memory import PeakMemoryTracker
from ladder_kernels.planning.methods import MethodTrainer
from ladder_kernels.units import parse_bytes

__all__ = [
    "plan",
    "max_seq_len",
    "plan_with_max_seq_len",
    "MemoryPlan",
    "load_config",
    "parse_bytes",
    "planning_fake_mode",
    "shipped_models",
    "TrackedTraining",
    "CUDA_CONTEXT_BYTES",
    "ALLOCATOR_SLACK",
    "state_cache_bytes_per_token",
]

# CUDA context + cuBLAS workspace as PyTorch sees them on a recent GPU (lazy module loading): ~0.4-0.5 GiB
CUDA_CONTEXT_BYTES = 512 * 2**20
# the caching allocator's reserve beyond max_memory_allocated (block rounding, fragmentation)
ALLOCATOR_SLACK = 0.05
MAX_CONTEXT_SEARCHED = 65536
BREAKDOWN_KEYS = ("weights", "optimizer_state", "saved_activations", "logits_loss", "transient")
_PHASE_CATEGORY = {"forward": "saved_activations", "backward": "transient", "optimizer": "optimizer_state"}


def state_cache_bytes_per_token(hidden_size: int, tensors: int, storage: str) -> int:
    """Bytes the backbone-state cache (finetune --epochs > 1) keeps per real token: `tensors` rows of hidden_size
    (the branch point, each ladder layer and the final hidden state), bf16, or int8 plus one fp32 scale per row."""
    return tensors * (hidden_size + 4 if storage == "int8" else 2 * hidden_size)


# --- inputs ------------------------------------------------------------------------------------------------
def shipped_models() -> tuple[str, ...]:
    """Names of the transformers configs shipped in ladder_kernels/configs (config JSON only, no weights)."""
    folder = resources.files("ladder_kernels") / "configs"
    return tuple(sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json")))


def load_config(config) -> "PretrainedConfig":  # noqa: F821
    """A transformers config from a config object, a shipped name, a config.json path or a checkpoint folder."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if not isinstance(config, (str, Path)):
        raise TypeError(
            f"plan: config must be a transformers config, a shipped model name or a path, got {type(config).__name__}"
        )
    name = str(config)
    if name in shipped_models():
        path = Path(str(resources.files("ladder_kernels") / "configs" / f"{name}.json"))
    else:
        path = Path(name)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"plan: config {name!r} is neither a shipped model {shipped_models()} nor an existing config.json or "
                "checkpoint folder"
            )
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    if "model_type" not in values:
        raise ValueError(f"plan: {path} has no model_type; is it a transformers config.json?")
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def _dtype(dtype) -> torch.dtype:
    try:
        return dtype_from_name(dtype)
    except ValueError as exc:
        raise ValueError(f"plan: {exc}") from None


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"plan: {name} must be a positive int, got {value!r}")


# --- fake execution ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def planning_fake_mode() -> Iterator["FakeTensorMode"]:  # noqa: F821
    """FakeTensorMode for building and training models on CPU-device fakes.

    Works around torch 2.13's `module.to()` under FakeTensorMode (pytorch/pytorch#170781): the fake-tensor
    converter memoizes fakes made by views (nn.Parameter detaches) in a WeakValueDictionary, and
    `swap_tensors`, which Module._apply uses for fakes, refuses tensors with weakrefs. Dropping the two
    tensors from the memo before the swap is the fix proposed upstream (pytorch/pytorch#178584).
    Real constant tensors (bitsandbytes' code tables) are allowed as inputs.

    transformers reads position ids to detect packed sequences, which it cannot do on fakes, and then builds
    an explicit [T, T] attention mask (and repeats GQA keys) where real tensors take SDPA's is_causal path.
    Planned inputs are never packed, so the detection is told so: the same path as on real tensors.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import masking_utils

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    original_swap = torch.utils.swap_tensors
    original_packed = getattr(masking_utils, "find_packed_sequence_indices", None)

    def swap_tensors(t1, t2):
        memo = mode.fake_tensor_converter.tensor_memo
        stale = [key for key, value in list(memo.items()) if value is t1 or value is t2]
        for key in stale:
            memo.pop(key, None)
        return original_swap(t1, t2)

    torch.utils.swap_tensors = swap_tensors
    if original_packed is not None:
        masking_utils.find_packed_sequence_indices = _no_packed_sequences
    try:
        with mode:
            yield mode
    finally:
        torch.utils.swap_tensors = original_swap
        if original_packed is not None:
            masking_utils.find_packed_sequence_indices = original_packed


def _no_packed_sequences(position_ids):
    return None


class TrackedTraining:
    """A method's MethodTrainer built and stepped under one PeakMemoryTracker that files memory by phase.

    fake=True (the planner): on CPU-device fakes, from a config. fake=False (measurements on this CPU): real
    tensors, from a config (random weights) or a checkpoint folder. Building is not part of any peak.
    """

    def __init__(self, source, method: str, dtype: torch.dtype = torch.bfloat16, fake: bool = True, **ladder_options):
        self._stack = contextlib.ExitStack()
        if fake:
            self._stack.enter_context(planning_fake_mode())
            if method in ("ladder", "xladder"):
                # the pruned side init reads backbone weights: most of a fake build's time, and nothing it
                # allocates outlives it (a random init of the same shapes trains in the same memory)
                ladder_options.setdefault("side_init", "random")
        self.mem = self._stack.enter_context(PeakMemoryTracker(classify=self._classify, category="weights"))
        try:
            self.trainer = MethodTrainer(method, source, dtype=dtype, device="cpu", **ladder_options)
        except BaseException:
            self._stack.close()
            raise
        # weights loaded from a checkpoint (safetensors) can be created outside the dispatcher: count them too
        self.mem.track(self.trainer.model)
        self.vocab_size = self.trainer.model.config.vocab_size
        self.weights_bytes = self.mem.current_bytes
        self.last_loss: Optional[torch.Tensor] = None

    def _classify(self, t: torch.Tensor) -> Optional[str]:
        # logits, their fp32 copies, softmax outputs and gradients: [..., vocab] (during the steps only:
        # the embeddings and the LM head are [vocab, hidden])
        vocab = getattr(self, "vocab_size", None)
        return "logits_loss" if vocab and t.dim() >= 2 and t.shape[-1] == vocab else None

    def _on_phase(self, name: str) -> None:
        self.mem.category = _PHASE_CATEGORY[name]

    def step(self, seq_len: int, batch_size: int) -> None:
        ids = torch.randint(0, self.vocab_size, (batch_size, seq_len))
        self.last_loss = self.trainer.step(ids, ids, on_phase=self._on_phase)

    def peak_of_steps(self, seq_len: int, batch_size: int, steps: int) -> tuple[int, dict[str, int]]:
        self.mem.reset_peak()
        for _ in range(steps):
            self.step(seq_len, batch_size)
        return self.mem.peak_bytes, dict(self.mem.peak_by_category)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "TrackedTraining":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the plan ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """Peak tensor memory of one training step of `method` on `model` at `seq_len` × `batch_size`.

    breakdown (bytes alive at the peak, summing to peak_bytes):
      weights            the model's parameters and buffers (4-bit backbone, 16-bit embeddings, trainable weights)
      optimizer_state    AdamW moments and step counters
      saved_activations  tensors made in the forward pass still alive (saved for backward)
      logits_loss        anything shaped [..., vocab]: logits, their fp32 copies, softmax, their gradients
      transient          tensors made in backward: gradients (of parameters too) and temporaries
    """

    method: str
    model: str
    seq_len: int
    batch_size: int
    dtype: torch.dtype
    peak_bytes: int
    breakdown: dict
    ladder_options: dict = field(default_factory=dict)
    config: Any = field(default=None, repr=False, compare=False)
    cache_bytes_per_token: int = 0  # ladder / xladder: the backbone-state cache's bytes per token (0: no cache)

    @property
    def cache_bytes_per_example(self) -> int:
        """The backbone-state cache's bytes for one example of seq_len tokens (an upper bound: real tokens only)."""
        return self.cache_bytes_per_token * self.seq_len

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    @property
    def required_bytes(self) -> int:
        """What a CUDA card needs: the peak + allocator slack + the CUDA context."""
        return required_bytes(self.peak_bytes)

    def fits(self, gpu_bytes) -> bool:
        """Whether the step fits a GPU with `gpu_bytes` of memory ('12GB' or an int), margins included."""
        return required_bytes(self.peak_bytes) <= parse_bytes(gpu_bytes)

    def max_seq_len(self, gpu_bytes, granularity: int = 256, limit: int = MAX_CONTEXT_SEARCHED) -> int:
        """The longest sequence length (a multiple of `granularity`, at most `limit`) at this batch size whose
        step fits `gpu_bytes`; 0 if none does (see the function max_seq_len)."""
        return max_seq_len(
            self.config,
            parse_bytes(gpu_bytes),
            method=self.method,
            batch_size=self.batch_size,
            dtype=self.dtype,
            granularity=granularity,
            limit=limit,
            **self.ladder_options,
        )

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "model": self.model,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "dtype": str(self.dtype).replace("torch.", ""),
            "peak_bytes": self.peak_bytes,
            "required_bytes": self.required_bytes,
            "breakdown": dict(self.breakdown),
            "ladder_options": dict(self.ladder_options),
            "cache_bytes_per_example": self.cache_bytes_per_example,
        }


def model_name(config, given) -> str:
    if isinstance(given, (str, Path)):
        return Path(str(given)).stem if str(given) not in shipped_models() else str(given)
    return getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"plan: method must be one of {METHODS}, got {method!r}")


def required_bytes(peak: int) -> int:
    return int(peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES


def _check_plan_args(method: str, batch_size: int, **positive_ints) -> None:
    _check_method(method)
    _check_positive_int("batch_size", batch_size)
    for name, value in positive_ints.items():
        _check_positive_int(name, value)


def _plan_from_run(
    run: TrackedTraining,
    cfg,
    config,
    method: str,
    seq_len: int,
    batch_size: int,
    dtype: torch.dtype,
    steps: int,
    ladder_options: dict,
) -> MemoryPlan:
    peak, by_category = run.peak_of_steps(seq_len, batch_size, steps)
    breakdown = {key: by_category.get(key, 0) for key in BREAKDOWN_KEYS}
    breakdown["weights"] += by_category.get("other", 0)
    model = run.trainer.model
    per_token = 0
    if hasattr(model, "side"):  # ladder / xladder
        tensors = 2 + len(model.side.ladder_sources)
        per_token = state_cache_bytes_per_token(cfg.hidden_size, tensors, model.ladder_config.ladder_storage)
    return MemoryPlan(
        method,
        model_name(cfg, config),
        seq_len,
        batch_size,
        dtype,
        peak,
        breakdown,
        dict(ladder_options),
        cfg,
        per_token,
    )


def _longest_fitting(peak_at, gpu_bytes: int, limit_units: int, known: dict[int, int]) -> int:
    """The largest k in [0, limit_units] with required_bytes(peak_at(k)) <= gpu_bytes, the peak growing with k.

    Peaks grow about linearly with the sequence length, so each guess is the secant through the last two
    measured points; a guess that does not halve the interval is followed by a bisection step.
    """
    measured = dict(known)
    lo, hi = 0, limit_units + 1  # k = lo fits (0 tokens trivially), k = hi does not (past the limit)
    for k, peak in measured.items():
        if required_bytes(peak) <= gpu_bytes:
            lo = max(lo, k)
        else:
            hi = min(hi, k)
    target = (gpu_bytes - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_SLACK)
    order = sorted(measured, key=lambda k: -k)[:2]  # the most recent two points
    bisect_next = False
    while hi - lo > 1:
        k = (lo + hi) // 2
        if not bisect_next and len(order) == 2 and order[0] != order[1]:
            (k1, k2), (p1, p2) = order, (measured[order[0]], measured[order[1]])
            slope = (p1 - p2) / (k1 - k2)
            if slope > 0:
                k = int(k1 + (target - p1) // slope)
        elif not bisect_next and len(order) == 1 and lo > 0:
            k = 2 * lo  # one point that fits: double it
        k = min(max(k, lo + 1), hi - 1)
        width = hi - lo
        measured[k] = peak_at(k)
        if required_bytes(measured[k]) <= gpu_bytes:
            lo = k
        else:
            hi = k
        order = [k] + order[:1]
        bisect_next = not bisect_next and (hi - lo) * 2 > width
    return lo


def plan(
    config,
    method: str = "ladder",
    seq_len: int = 2048,
    batch_size: int = 1,
    dtype=torch.bfloat16,
    steps: int = 2,
    **ladder_options,
) -> MemoryPlan:
    """Plan one method's training step (see the module docstring). `config`: a transformers config, a
    shipped model name (`shipped_models()`), a config.json or a checkpoint folder. ladder_options:
    LadderConfig fields for ladder / xladder (e.g. reduction_factor=8, ladder_storage="int8")."""
    cfg = load_config(config)
    _check_plan_args(method, batch_size, seq_len=seq_len, steps=steps)
    dtype = _dtype(dtype)
    with TrackedTraining(cfg, method, dtype, fake=True, **ladder_options) as run:
        return _plan_from_run(run, cfg, config, method, seq_len, batch_size, dtype, steps, ladder_options)


def max_seq_len(
    config,
    gpu_bytes,
    method: str = "ladder",
    batch_size: int = 1,
    dtype=torch.bfloat16,
    granularity: int = 256,
    limit: int = MAX_CONTEXT_SEARCHED,
    **ladder_options,
) -> int:
    """The longest multiple of `granularity` (≤ limit) whose training step fits `gpu_bytes` with the margins
    of MemoryPlan.fits; 0 if none does. Memory only: a length beyond the model's max_position_embeddings
    fits but may not train well. One fake model: after a warm-up step (the optimizer state exists), each
    candidate's peak is one steady-state step."""
    cfg = load_config(config)
    _check_plan_args(method, batch_size, granularity=granularity, limit=limit)
    gpu_bytes, dtype = parse_bytes(gpu_bytes), _dtype(dtype)
    if required_bytes(0) >= gpu_bytes:
        return 0  # not even the CUDA context fits
    with TrackedTraining(cfg, method, dtype, fake=True, **ladder_options) as run:
        run.peak_of_steps(granularity, batch_size, 1)  # warm-up: AdamW state
        peak_at = lambda k: run.peak_of_steps(k * granularity, batch_size, 1)[0]  # noqa: E731
        return _longest_fitting(peak_at, gpu_bytes, limit // granularity, {}) * granularity


def plan_with_max_seq_len(
    config,
    gpu_bytes,
    method: str = "ladder",
    seq_len: int = 2048,
    batch_size: int = 1,
    dtype=torch.bfloat16,
    granularity: int = 256,
    limit: int = MAX_CONTEXT_SEARCHED,
    **ladder_options,
) -> tuple[MemoryPlan, int]:
    """`plan(...)` and `max_seq_len(...)` from one fake model (what the CLI prints per method)."""
    cfg = load_config(config)
    _check_plan_args(method, batch_size, seq_len=seq_len, granularity=granularity, limit=limit)
    gpu_bytes, dtype = parse_bytes(gpu_bytes), _dtype(dtype)
    with TrackedTraining(cfg, method, dtype, fake=True, **ladder_options) as run:
        result = _plan_from_run(run, cfg, config, method, seq_len, batch_size, dtype, 2, ladder_options)
        known = {seq_len // granularity: result.peak_bytes} if seq_len % granularity == 0 and seq_len <= limit else {}
        peak_at = lambda k: run.peak_of_steps(k * granularity, batch_size, 1)[0]  # noqa: E731
        return result, _longest_fitting(peak_at, gpu_bytes, limit // granularity, known) * granularity
