"""The divergence guard: largest loss spike, one warning, the same after a resume."""

from __future__ import annotations

import random

from ladder_kernels.defaults import LOSS_SPIKE_FACTOR, LOSS_SPIKE_MIN_STEPS
from ladder_kernels.train.loss_watch import LossWatch, largest_spike, spike_at


def _descending(n, seed=0):
    rng = random.Random(seed)
    return [2.0 * 0.98**i * (1 + 0.05 * rng.random()) for i in range(n)]


def test_a_smooth_descent_has_no_spike_above_the_factor_and_never_warns(capsys):
    history, watch = [], LossWatch()
    for v in _descending(60):
        history.append(v)
        watch.observe(history)
    assert watch.largest is not None and watch.largest.ratio < 1.2
    assert capsys.readouterr().err == ""


def test_a_spike_is_found_reported_and_warned_about_once(capsys):
    losses = _descending(30)
    losses[12] = 40.0  # like Gemma-3 at lr 6e-3
    losses[20] = float("nan")  # a skipped step neither counts nor breaks the mean
    losses[25] = 30.0
    history, watch = [], LossWatch(lr_flag="--lr")
    for v in losses:
        history.append(v)
        watch.observe(history)
    spike = watch.largest
    assert spike.step == 13 and spike.loss == 40.0
    assert spike.ratio == 40.0 / (sum(losses[:12]) / 12)
    err = capsys.readouterr().err
    assert err.count("warning: step 13's training loss 40") == 1 and "lower --lr" in err
    assert "step 26" not in err  # once only
    assert watch.postfix() == f"x{spike.ratio:.1f}@13"


def test_resumed_watch_knows_the_past_spike_and_does_not_warn_again(capsys):
    losses = _descending(30)
    losses[10] = 50.0
    resumed = LossWatch(losses[:20])
    assert resumed.largest == largest_spike(losses[:20]) and resumed.largest.step == 11
    assert resumed.warned
    resumed.observe(losses[:21])
    assert capsys.readouterr().err == ""


def test_too_few_steps_give_no_ratio():
    history = [5.0] * (LOSS_SPIKE_MIN_STEPS - 1) + [500.0]
    assert spike_at(history, len(history) - 1) is None
    history = [5.0] * LOSS_SPIKE_MIN_STEPS + [5.0 * (LOSS_SPIKE_FACTOR + 1)]
    assert spike_at(history, len(history) - 1).ratio == LOSS_SPIKE_FACTOR + 1
