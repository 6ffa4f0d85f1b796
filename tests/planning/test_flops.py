"""planning/flops.py against a direct count: torch's FlopCounterMode on a tiny dense backbone (forward; forward +
backward) and on a real side network's blocks, and its argument checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.side import side_network
from ladder_kernels.planning.flops import (
    Batch,
    ModelShape,
    backbone_forward_flops,
    qlora_training_flops,
    run_flops,
    side_training_flops,
    step_flops,
)
from tests.helpers import tiny_backbone

# FlopCounterMode counts the matmuls (2 per multiply-add); attention runs on SDPA's math backend so that its
# products are plain bmm calls it sees (it does not count CPU flash attention), over the full square as the
# analytic count assumes. What neither counts (norms, softmax, rotary) is left out of both, so they agree to
# rounding; the tolerance allows for an extra small matmul a transformers version might add.
TOLERANCE = 0.01


def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def model():
    return tiny_backbone("llama", num_layers=3, intermediate_size=96)


def test_backbone_forward_matches_flop_counter(model):
    shape = ModelShape.of(model.config)
    ids = torch.randint(3, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        direct = counted(lambda: model(input_ids=ids))
    analytic = backbone_forward_flops(shape, Batch(2, 13, 0), lm_head_tokens=2 * 13)
    assert abs(analytic - direct) <= TOLERANCE * direct, (analytic, direct)
    # without lm_head: the decoder layers alone
    without_head = direct - 2 * 2 * 13 * model.config.hidden_size * model.config.vocab_size
    assert abs(backbone_forward_flops(shape, Batch(2, 13, 0)) - without_head) <= TOLERANCE * without_head


def test_full_backward_is_what_qlora_pays_for_the_backbone(model):
    """The backbone part of QLoRA's count: forward + every input gradient (the weights frozen), counted directly
    on the dense model with the embeddings' output requiring grad (as peft's prepare_model_for_kbit_training
    makes it)."""
    shape = ModelShape.of(model.config)
    ids = torch.randint(3, model.config.vocab_size, (2, 11))
    for p in model.parameters():
        p.requires_grad_(False)

    def step():
        emb = model.model.embed_tokens(ids).requires_grad_(True)
        model(inputs_embeds=emb).logits.float().sum().backward()

    direct = counted(step)
    analytic = qlora_training_flops(shape, Batch(2, 11, 2 * 11))["backbone"]
    assert abs(analytic - direct) <= TOLERANCE * direct, (analytic, direct)


@pytest.mark.parametrize(
    "ladder", [LadderConfig(reduction_factor=4), LadderConfig(reduction_factor=2, xladder_depth=1)]
)
def test_side_blocks_match_flop_counter(model, ladder):
    from ladder_kernels.nn.backbone import BackboneSpec

    shape = ModelShape.of(model.config)
    side = side_network(BackboneSpec.of(model), ladder)
    b, t, d = 2, 9, side.shape.width
    s0 = torch.randn(b, t, d, requires_grad=True)
    zs = [torch.randn(b, t, d, requires_grad=True) for _ in side.ladder_sources]
    positions = torch.arange(t).expand(b, t)
    with torch.no_grad():
        forward = counted(lambda: side(s0, zs, positions))
    both = counted(lambda: side(s0, zs, positions).sum().backward())
    analytic = side_training_flops(shape, ladder, Batch(b, t, 0))["blocks"]
    assert abs(analytic / 3 - forward) <= TOLERANCE * forward, (analytic / 3, forward)
    assert abs(analytic - both) <= TOLERANCE * both, (analytic, both)


def test_the_parts_add_up_per_method(model):
    shape = ModelShape.of(model.config)
    lc = LadderConfig(reduction_factor=4)
    batch = Batch(4, 16, 4)
    side = sum(side_training_flops(shape, lc, batch).values())
    assert step_flops(shape, "ladder", [batch], lc) == backbone_forward_flops(shape, batch) + side
    assert step_flops(shape, "ladder", [batch], lc, from_cache=True) == side
    assert step_flops(shape, "qlora", [batch, batch]) == 2 * sum(qlora_training_flops(shape, batch).values())
    assert step_flops(shape, "qlora", [batch]) > step_flops(shape, "ladder", [batch], lc)
    # lm_head and up_proj only on the loss tokens
    more_loss = side_training_flops(shape, lc, Batch(4, 16, 8))
    assert more_loss["lm_head"] == 2 * side_training_flops(shape, lc, batch)["lm_head"]
    assert more_loss["blocks"] == side_training_flops(shape, lc, batch)["blocks"]
    # a run with the cache: one backbone pass over the examples, then every epoch from the cache
    epoch = [[batch]] * 5
    assert (
        run_flops(shape, "ladder", epoch, epochs=3, ladder=lc) == 5 * backbone_forward_flops(shape, batch) + 15 * side
    )
    assert run_flops(shape, "ladder", epoch, ladder=lc) == 5 * step_flops(shape, "ladder", [batch], lc)


def test_model_shape_from_a_config(model):
    shape = ModelShape.of(model.config)
    c = model.config
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.vocab_size) == (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
    )
    assert shape.head_dim == c.hidden_size // c.num_attention_heads


def test_bad_input_is_named(model):
    shape = ModelShape.of(model.config)
    lc = LadderConfig()
    batch = Batch(1, 8, 1)
    with pytest.raises(ValueError, match="Batch.width must be an integer >= 1, got 0"):
        Batch(1, 0, 0)
    with pytest.raises(ValueError, match="Batch.sequences must be an integer >= 1"):
        Batch(True, 4, 0)
    with pytest.raises(ValueError, match="Batch.loss_tokens 9 exceeds"):
        Batch(1, 8, 9)
    with pytest.raises(ValueError, match="ModelShape.num_heads must be an integer >= 1"):
        dataclasses.replace(shape, num_heads=0)
    with pytest.raises(ValueError, match="method must be one of ladder, xladder, qlora, got 'lora'"):
        step_flops(shape, "lora", [batch])
    with pytest.raises(ValueError, match="method ladder needs ladder"):
        step_flops(shape, "ladder", [batch])
    with pytest.raises(ValueError, match="batches must hold at least one"):
        step_flops(shape, "qlora", [])
    with pytest.raises(ValueError, match="from_cache applies to ladder and xladder"):
        step_flops(shape, "qlora", [batch], from_cache=True)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        run_flops(shape, "ladder", [[batch]], epochs=0, ladder=lc)
    with pytest.raises(ValueError, match="epochs > 1 applies to ladder and xladder"):
        run_flops(shape, "qlora", [[batch]], epochs=2)
    with pytest.raises(ValueError, match="lm_head_tokens must be an integer >= 0"):
        backbone_forward_flops(shape, batch, lm_head_tokens=-1)
    with pytest.raises(ValueError, match="ladder must be a LadderConfig"):
        side_training_flops(shape, {"reduction_factor": 8}, batch)
    with pytest.raises(ValueError, match="config lacks intermediate_size"):
        ModelShape.of(type("Config", (), {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})())
