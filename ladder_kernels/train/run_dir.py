"""The run folder: what it holds, checks before a run writes to it, and the saved adapter.

run_config.json     the configuration (written once, before training)
checkpoint.pt       trainable weights, optimizer, scheduler, step, RNG states, data order, loss history
adapter/            the trained side network (or LoRA adapter) + finetune.json naming its backbone
summary.json/.md    accuracy before/after, steps, wall time, tokens/s, peak memory, adapter size
loss_curve.png
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from ladder_kernels.defaults import DTYPES
from ladder_kernels.errors import ModelError, RunDirError
from ladder_kernels.io import atomic_folder, write_text_atomic
from ladder_kernels.train.backbones import NAMED_MODELS, load_backbone, load_tokenizer, resolve_model
from ladder_kernels.train.config import RESUMABLE_CHANGES, FinetuneConfig, flag
from ladder_kernels.train.data import Dataset

RUN_CONFIG, CHECKPOINT, ADAPTER, SUMMARY_JSON, SUMMARY_MD, LOSS_PNG = (
    "run_config.json",
    "checkpoint.pt",
    "adapter",
    "summary.json",
    "summary.md",
    "loss_curve.png",
)
ADAPTER_INFO = "finetune.json"


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
            raise RunDirError(
                f"--resume: {flag(name)} {value!r} differs from the run in {output_dir} ({getattr(cfg, name)!r}); "
                "a resumed run keeps its configuration"
            )
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
        raise RunDirError(
            f"--output-dir {out} already holds {what}; pass --resume to continue a run, or choose another --output-dir"
        )


def save_adapter(model, cfg: FinetuneConfig, dataset: Dataset, target: Path) -> int:
    """Save the side network / LoRA adapter atomically (temp folder, then rename); returns its size in bytes.
    An existing adapter (a run stopped by --max-minutes and then resumed) is replaced."""
    with atomic_folder(target, replace=True) as tmp:
        model.save_pretrained(tmp)
        info = {
            "model": cfg.model if cfg.model in NAMED_MODELS else str(Path(cfg.model).resolve()),
            "method": cfg.method,
            "dtype": cfg.dtype_name,
            "matmul_dtype": cfg.matmul_dtype_name,
            "task": cfg.task,
            "labels": dataset.labels,
            "chat": dataset.chat,
        }
        write_text_atomic(tmp / ADAPTER_INFO, json.dumps(info, indent=2) + "\n")
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder: `path` itself, or the adapter/ inside a finetune run folder."""
    path = Path(path)
    for candidate in (path, path / ADAPTER):
        if (candidate / ADAPTER_INFO).is_file():
            return candidate
    if not path.exists():
        raise RunDirError(f"--adapter: no such folder: {path}")
    raise RunDirError(f"--adapter: {path} holds no adapter saved by `ladder-kernels finetune` (no {ADAPTER_INFO})")


def load_finetuned(path: str | Path):
    """(model in eval mode, tokenizer, adapter info) from an adapter folder or a run folder."""
    folder = adapter_folder(path)
    info = json.loads((folder / ADAPTER_INFO).read_text(encoding="utf-8"))
    model_dir = resolve_model(info["model"])
    tokenizer = load_tokenizer(model_dir)
    dtype = DTYPES[info["dtype"]]
    if info["method"] == "qlora":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from ladder_kernels.planning.methods import make_qlora_model

        model = make_qlora_model(model_dir, compute_dtype=dtype)
        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    else:
        from ladder_kernels.nn.ladder import LadderModel
        from ladder_kernels.nn.nf4_linear import set_matmul_dtype_

        try:
            model = LadderModel.from_pretrained(load_backbone(model_dir, dtype), folder)
        except (ValueError, OSError) as exc:
            raise ModelError(f"--adapter: cannot load the side network in {folder}: {exc}") from None
        set_matmul_dtype_(model.backbone, DTYPES[info.get("matmul_dtype", info["dtype"])])  # as it was trained
    return model.eval(), tokenizer, info
