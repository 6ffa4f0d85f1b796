"""The divergence guard a user sees: the largest loss spike so far (progress bar, summary) and one warning when a
step's loss jumps several times above the running mean. Derived from the loss history alone, so a resumed run
reports the same as an uninterrupted one."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from ladder_kernels.defaults import LOSS_SPIKE_FACTOR, LOSS_SPIKE_MIN_STEPS, LOSS_SPIKE_WINDOW


@dataclass(frozen=True)
class Spike:
    step: int  # 1-based optimizer step
    loss: float
    running_mean: float  # of the finite losses of the LOSS_SPIKE_WINDOW steps before it

    @property
    def ratio(self) -> float:
        return self.loss / self.running_mean

    def to_dict(self) -> dict:
        return {"step": self.step, "loss": self.loss, "running_mean": self.running_mean, "ratio": self.ratio}


def spike_at(history: Sequence[float], index: int) -> Optional[Spike]:
    """Step index's loss against the mean of the steps before it; None while too few finite ones precede it."""
    before = [v for v in history[max(0, index - LOSS_SPIKE_WINDOW) : index] if math.isfinite(v)]
    loss = history[index]
    if len(before) < LOSS_SPIKE_MIN_STEPS or not math.isfinite(loss):
        return None
    mean = sum(before) / len(before)
    return Spike(index + 1, loss, mean) if mean > 0 else None


def largest_spike(history: Sequence[float]) -> Optional[Spike]:
    spikes = [s for i in range(len(history)) if (s := spike_at(history, i)) is not None]
    return max(spikes, key=lambda s: s.ratio, default=None)


class LossWatch:
    """Call `observe(history)` after each step: keeps the largest spike and warns once on stderr past the factor."""

    def __init__(self, history: Sequence[float] = (), factor: float = LOSS_SPIKE_FACTOR, lr_flag: str = "--lr"):
        self.factor, self.lr_flag = factor, lr_flag
        self.largest = largest_spike(history)
        self.warned = self.largest is not None and self.largest.ratio > factor

    def observe(self, history: Sequence[float]) -> Optional[Spike]:
        spike = spike_at(history, len(history) - 1)
        if spike is None:
            return self.largest
        if self.largest is None or spike.ratio > self.largest.ratio:
            self.largest = spike
        if spike.ratio > self.factor and not self.warned:
            self.warned = True
            print(
                f"\nwarning: step {spike.step}'s training loss {spike.loss:.3g} is {spike.ratio:.1f}x the mean of the "
                f"steps before it ({spike.running_mean:.3g}): training may be diverging; if it does not recover, "
                f"lower {self.lr_flag} (this warning is shown once)",
                file=sys.stderr,
            )
        return self.largest

    def postfix(self) -> str:
        """For the progress bar: the largest spike ratio so far."""
        return "-" if self.largest is None else f"x{self.largest.ratio:.1f}@{self.largest.step}"
