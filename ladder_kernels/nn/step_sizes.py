"""Per-tensor learning rates for the side network: steps relative to each tensor's own scale.

Adam moves every weight by about `lr` per step whatever its gradient's size, so one absolute learning rate
changes a tensor by lr / rms(W) of itself per step. A pruned side network copies the backbone's weights, whose
scale differs by family (measured: SmolLM2-135M's projections have rms ~0.2, Gemma-3-270M's ~0.04 with norm
gains up to ~400), so lr 6e-3 is a 3% step on one and a 15% step on the other: Gemma's loss then spikes above 100.

lr_rule "relative": each tensor's learning rate is `lr x its reference scale` (its initial rms; for a tensor that
starts at zero the rms a unit-variance input would need to give a unit output, 1/sqrt(fan_in); for a gate's α its
temperature), so `lr` is the relative change per step, the same on every backbone. lr_rule "uniform": one
absolute rate for all (the optimizer's usual meaning).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ladder_kernels.defaults import LR_RULES, LrRule


@torch.no_grad()
def reference_scales(side: nn.Module) -> dict[str, float]:
    """name -> the scale a relative step is measured against, for every trainable parameter of a SideNetwork."""
    scales = {}
    for name, p in side.named_parameters():
        if not p.requires_grad:
            continue
        if isinstance(p, FakeTensor) or p.is_meta:  # the memory planner: values unknown, one group each all the same
            scales[name] = 1.0
            continue
        if name.endswith("alpha"):  # μ = sigmoid(α/T): α's natural unit is T
            scales[name] = float(side.gates[0].temperature)
            continue
        rms = float(p.detach().float().pow(2).mean().sqrt())
        if rms == 0.0:  # zero-initialised (up_proj when the output mixes in the backbone, biases)
            rms = 1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 1.0
        scales[name] = rms
    return scales


def tensor_lrs(model: nn.Module, lr: float, rule: LrRule) -> dict[str, float]:
    """name -> learning rate of each trainable parameter of `model` ("relative" needs a LadderModel's `.side`)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if rule == "uniform":
        return dict.fromkeys(trainable, lr)
    if rule != "relative":
        raise ValueError(f"lr_rule must be one of {', '.join(LR_RULES)}, got {rule!r}")
    side = getattr(model, "side", None)
    if side is None:
        raise ValueError(f"lr_rule 'relative' applies to a LadderModel's side network, not {type(model).__name__}")
    scales = {f"side.{n}": s for n, s in reference_scales(side).items()}
    missing = [n for n in trainable if n not in scales]
    if missing:
        raise ValueError(f"lr_rule 'relative': trainable parameters outside the side network: {missing[:3]}")
    return {n: lr * scales[n] for n in trainable}


def param_groups(model: nn.Module, lr: float, rule: LrRule) -> list[dict]:
    """AdamW parameter groups: one for "uniform"; one per tensor for "relative", in named_parameters order (a
    checkpoint's optimizer state maps onto them again)."""
    params = dict(model.named_parameters())
    lrs = tensor_lrs(model, lr, rule)
    if rule == "uniform":
        return [{"params": [params[n] for n in lrs], "lr": lr}]
    return [{"params": [params[n]], "lr": rate} for n, rate in lrs.items()]
