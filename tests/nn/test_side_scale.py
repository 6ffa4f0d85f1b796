"""What makes the side network independent of the backbone's scale: ladder_norm 'rms' and the relative lr rule."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.ladder import LadderModel
from ladder_kernels.nn.side import BRANCH
from ladder_kernels.nn.step_sizes import param_groups, reference_scales, tensor_lrs
from tests.helpers import rel_err, tiny_backbone


def _model(family="llama", **config):
    torch.manual_seed(0)
    return LadderModel(tiny_backbone(family, num_layers=3), LadderConfig(reduction_factor=2, **config))


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_rms_ladder_norm_is_the_projection_of_the_normalised_input(storage):
    side = _model(ladder_norm="rms", ladder_storage=storage, backend="torch").side
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 7, side.shape.hidden_size, generator=gen) * torch.linspace(0.1, 300, 7)[None, :, None]
    weight = side.ladders[1]
    with torch.no_grad():
        weight.add_(0.05 * torch.randn(weight.shape, generator=gen))
    z = side.project(1, h)
    g = torch.randn(z.shape, generator=gen)
    (z * g).sum().backward()

    h64, w64 = h.double(), weight.detach().double().requires_grad_()
    eps = side.shape.rms_norm_eps
    ref = (h64 / (h64.pow(2).mean(-1, keepdim=True) + eps).sqrt()) @ w64.T
    (ref * g.double()).sum().backward()
    assert rel_err(z, ref) < 1e-5
    # bf16 storage keeps h in bf16 for dW; int8 keeps it per-row absmax-quantized: within their rounding
    assert rel_err(weight.grad, w64.grad) < (4e-3 if storage == "bf16" else 2e-2)


def test_rms_ladder_norm_makes_what_the_side_reads_independent_of_the_inputs_scale():
    side = _model(ladder_norm="rms", backend="torch").side
    h = torch.randn(1, 5, side.shape.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(side.project(BRANCH, 1000.0 * h), side.project(BRANCH, h)) < 1e-5
        plain = _model(backend="torch").side
        assert rel_err(plain.project(BRANCH, 1000.0 * h), 1000.0 * plain.project(BRANCH, h)) < 1e-5


def test_relative_lrs_are_each_tensors_initial_rms_times_lr():
    model = _model()
    lrs = tensor_lrs(model, 0.05, "relative")
    side = dict(model.side.named_parameters())
    assert set(lrs) == {f"side.{n}" for n in side}
    for name, p in side.items():
        rms = p.detach().float().pow(2).mean().sqrt().item()
        if name.endswith("alpha"):
            expected = 0.05 * model.side.gates[0].temperature
        elif rms == 0:
            expected = 0.05 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.05
        else:
            expected = 0.05 * rms
        assert lrs[f"side.{name}"] == pytest.approx(expected, rel=1e-6), name
    assert lrs["side.up_proj.weight"] > 0  # starts at zero, still learns


def test_relative_lrs_follow_the_backbones_weight_scale():
    """The point of the rule: a backbone whose weights are 5x smaller gets 5x smaller steps on its pruned copy."""
    backbone = tiny_backbone("llama", num_layers=3)
    small = copy.deepcopy(backbone)
    with torch.no_grad():
        for name, p in small.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(0.2)
    ratios = {}
    for tag, bb in (("big", backbone), ("small", small)):
        torch.manual_seed(0)
        ratios[tag] = tensor_lrs(LadderModel(bb, LadderConfig(reduction_factor=2)), 0.03, "relative")
    block_q = "side.blocks.0.attn.q_proj.weight"
    assert ratios["small"][block_q] == pytest.approx(0.2 * ratios["big"][block_q], rel=1e-4)


def test_param_groups_cover_every_trainable_tensor_once():
    model = _model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for rule in ("uniform", "relative"):
        groups = param_groups(model, 1e-3, rule)
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in trainable) and len(set(ids)) == len(ids)
    assert len(param_groups(model, 1e-3, "uniform")) == 1


def test_relative_rule_needs_a_side_network_and_a_known_name():
    with pytest.raises(ValueError, match="lr_rule 'relative' applies to a LadderModel"):
        tensor_lrs(torch.nn.Linear(3, 3), 1e-3, "relative")
    with pytest.raises(ValueError, match="lr_rule must be one of relative, uniform"):
        tensor_lrs(_model(), 1e-3, "absolute")


def test_reference_scales_are_positive_and_finite_for_every_family():
    for family in ("llama", "qwen2", "gemma", "gemma3"):
        scales = reference_scales(_model(family).side)
        assert all(s > 0 and math.isfinite(s) for s in scales.values()), family
