"""Checkpoints that resume bit-exactly: trainable weights, optimizer, schedule, RNG states, written atomically."""

from __future__ import annotations

import io
import random
from pathlib import Path

import torch

from ladder_kernels.errors import RunDirError
from ladder_kernels.io import write_bytes_atomic


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
