"""Streaming proof: what one training step keeps per backbone layer is one ladder input (bf16, or int8 + one
fp32 scale per row) plus the side block's own activations at width D/r, never the backbone layer's internals.

Measured with the dispatch-mode tracker of live tensor storages (ladder_kernels.planning.memory) over L = 2, 4, 8.
"""

import pytest
import torch

from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.ladder import LadderModel
from ladder_kernels.nn.side import side_compute_dtype
from ladder_kernels.planning.memory import PeakMemoryTracker
from tests.helpers import tiny_backbone

B, T, D, INTERMEDIATE, VOCAB, R = 1, 128, 256, 1024, 128, 16
LAYERS = (2, 4, 8)


def backbone(num_layers, dtype):
    return tiny_backbone(
        "llama",
        num_layers=num_layers,
        hidden_size=D,
        intermediate_size=INTERMEDIATE,
        num_heads=4,
        num_kv_heads=4,
        vocab_size=VOCAB,
        dtype=dtype,
    )


def ladder_step_bytes(num_layers, dtype, storage, quant, checkpointing):
    """(bytes kept for backward at the end of the forward, peak of forward + backward, side-alone kept bytes)."""
    config = LadderConfig(
        reduction_factor=R, ladder_storage=storage, backbone_quant=quant, side_checkpointing=checkpointing
    )
    model = LadderModel(backbone(num_layers, dtype), config)
    ids = torch.randint(3, VOCAB, (B, T))
    model(ids, labels=ids).loss.backward()  # warm-up: lazily built state is not part of a step
    model.zero_grad(set_to_none=True)
    with PeakMemoryTracker() as mem:
        loss = model(ids, labels=ids).loss
        kept = mem.current_bytes
        loss.backward()
    step_peak = mem.peak_bytes
    del loss
    # The side network alone on the same shapes: its own activations, to separate them from the ladder inputs. Its
    # inputs come in the dtype it computes in (fp32 for 16-bit on this CPU), as the model's converted ladder outputs do.
    side = model.side
    with torch.no_grad():
        h_final = torch.randn(B, T, D, dtype=dtype)
    side_dtype = side_compute_dtype(dtype, h_final.device)
    with PeakMemoryTracker() as mem:
        zs = [torch.randn(B, T, side.shape.width, dtype=side_dtype) for _ in side.projections()]
        out = side.mix(side(zs[0], zs[1:], torch.arange(T)[None]), h_final)
        side_kept = mem.current_bytes
    del out
    return kept, step_peak, side_kept


def full_backbone_step_peak(num_layers, dtype):
    """The counterfactual: the same backbone back-propagated through (what QLoRA-style training keeps)."""
    model = backbone(num_layers, dtype)
    ids = torch.randint(3, VOCAB, (B, T))
    with PeakMemoryTracker() as mem:
        model(ids, labels=ids).loss.backward()
    return mem.peak_bytes


def per_layer(values):
    """Growth per added layer between consecutive L (2->4, 4->8)."""
    return [(values[b] - values[a]) / (b - a) for a, b in zip(LAYERS, LAYERS[1:])]


@pytest.mark.parametrize(
    "dtype, storage, quant, checkpointing, ladder_bytes",
    [
        (torch.float32, "bf16", "none", False, B * T * D * 2),  # a bf16 copy of each fp32 h_l
        (torch.float32, "int8", "none", False, B * T * (D + 4)),  # int8 rows + one fp32 scale per row: half
        (torch.bfloat16, "bf16", "nf4", False, B * T * D * 2),  # bf16 compute on an NF4 backbone: h_l itself
        (torch.bfloat16, "int8", "none", True, B * T * (D + 4)),  # side blocks recomputed in backward
    ],
)
def test_memory_grows_by_one_ladder_input_per_layer(dtype, storage, quant, checkpointing, ladder_bytes):
    kept, peak, side_kept = zip(*(ladder_step_bytes(n, dtype, storage, quant, checkpointing) for n in LAYERS))
    kept, peak, side_kept = (dict(zip(LAYERS, v)) for v in (kept, peak, side_kept))
    side_block = per_layer(side_kept)
    assert side_block[0] == side_block[1] > 0
    if checkpointing:  # only each block's inputs s and z (plus the ladder's output) stay: a few widths per token
        assert side_block[0] <= 4 * B * T * (D // R) * dtype.itemsize
    # Kept for backward, per layer: exactly one ladder input plus one side block's activations (width D/r).
    for growth in per_layer(kept):
        assert growth == pytest.approx(ladder_bytes + side_block[0], rel=0.01)
    # The step's peak grows by no more than that, and by at least the ladder input.
    for growth in per_layer(peak):
        assert 0.95 * ladder_bytes <= growth <= 1.01 * (ladder_bytes + side_block[0])
    # A backbone back-propagated through keeps its layers' internals: many times more per layer.
    full = {n: full_backbone_step_peak(n, dtype) for n in (2, 4)}
    full_growth = (full[4] - full[2]) / 2
    assert max(per_layer(peak)) < 0.2 * full_growth, (per_layer(peak), full_growth)
