"""Pruned initialisation of the side network (LST's structural pruning, adapted to RoPE and GQA): side blocks
start as the backbone's layers restricted to the hidden channels, heads' rotary pairs and MLP units of largest
norm, and the ladders as selections of those channels."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ladder_kernels.nn.backbone import BackboneSpec, DenseLayerWeights, dense_layer_weights, norm_gain
from ladder_kernels.nn.side import SideBlock, SideNetwork


@torch.no_grad()
def prune_into_side_(side: SideNetwork, spec: BackboneSpec) -> None:
    """side_init='pruned': hidden channels of largest norm over the source layers; each side block from the
    backbone layer after its ladder source (the last layer for the last; xLadder's free blocks from the top δ
    layers again); ladders as channel selections; the side's final norm from the backbone's."""
    shape, layers, n = side.shape, spec.layers, spec.num_layers
    heads, kv, head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if shape.head_dim > head_dim or shape.intermediate_size > spec.intermediate_size:
        raise ValueError(
            f"side_init='pruned' needs side head_dim <= {head_dim} and intermediate size <= {spec.intermediate_size}"
        )
    first_free = n - side.num_free_blocks
    sources = [min(i + 1, n - 1) for i in side.ladder_sources] + list(range(first_free, n))
    device = side.branch_proj.device
    scores = torch.zeros(shape.hidden_size, device=device)
    for i in sorted(set(sources)):
        scores += hidden_channel_scores(dense_layer_weights(layers[i], shape.hidden_size)).to(device)
    channels = torch.topk(scores, shape.width).indices.sort().values
    inv_freq = spec.inv_freq().to(device)
    for block, i in zip(side.blocks, sources):
        w = dense_layer_weights(layers[i], shape.hidden_size)
        load_pruned_block_(block, w, channels, heads, kv, head_dim, inv_freq, spec.attention_scaling(i))
    load_selection_ladders_(side, channels)
    side.norm.weight.copy_(norm_gain(spec.final_norm, shape.hidden_size, device)[channels])


def hidden_channel_scores(w: DenseLayerWeights) -> Tensor:
    """How much a layer reads from (gain-scaled input columns) and writes to (output rows) each hidden channel."""
    read = sum(
        (m * gain).pow(2).sum(0)
        for m, gain in (
            (w.q, w.attn_gain),
            (w.k, w.attn_gain),
            (w.v, w.attn_gain),
            (w.gate, w.mlp_gain),
            (w.up, w.mlp_gain),
        )
    )
    write = w.o.pow(2).sum(1) + w.down.pow(2).sum(1)
    return read + write


def _top_sorted(scores: Tensor, k: int) -> Tensor:
    return torch.topk(scores, k).indices.sort().values


@torch.no_grad()
def load_pruned_block_(
    block: SideBlock,
    w: DenseLayerWeights,
    channels: Tensor,
    backbone_heads: int,
    backbone_kv_heads: int,
    backbone_head_dim: int,
    backbone_inv_freq: Tensor,
    backbone_scaling: float,
) -> None:
    """Set a side block to the backbone layer `w` restricted to hidden `channels`, per kv head the rotary pairs
    (and value dims) of largest norm, and the MLP units of largest norm. backbone_scaling: the layer's
    attention score scale (head_dim^-0.5, or Gemma's query_pre_attn_scalar^-0.5)."""
    attn = block.attn
    if (attn.num_heads, attn.num_kv_heads) != (backbone_heads, backbone_kv_heads):
        raise ValueError(
            f"side_init='pruned' needs the side's heads ({attn.num_heads}, kv {attn.num_kv_heads}) to equal the "
            f"backbone's ({backbone_heads}, kv {backbone_kv_heads}); leave side_num_heads/side_num_kv_heads unset"
        )
    hd, hd_s, group = backbone_head_dim, attn.head_dim, backbone_heads // backbone_kv_heads
    half, half_s = hd // 2, hd_s // 2
    cols = lambda m, gain: (m * gain)[:, channels]  # noqa: E731  (folds the norm gain in for scoring only)
    o = w.o[channels].view(len(channels), backbone_heads, hd)
    q_eff = cols(w.q, w.attn_gain).view(backbone_heads, hd, -1).pow(2).sum(-1)  # [H, hd]
    k_eff = cols(w.k, w.attn_gain).view(backbone_kv_heads, hd, -1).pow(2).sum(-1)
    v_eff = cols(w.v, w.attn_gain).view(backbone_kv_heads, hd, -1).pow(2).sum(-1)
    q_rows, kv_rows, v_rows, o_cols, inv_freq = [], [], [], [], []
    for g in range(backbone_kv_heads):
        heads = range(g * group, (g + 1) * group)
        pair_score = q_eff[list(heads)].sum(0) / group + k_eff[g]
        pairs = _top_sorted(pair_score[:half] + pair_score[half:], half_s)
        dims = torch.cat((pairs, pairs + half))
        vdims = _top_sorted(v_eff[g] + o[:, list(heads)].pow(2).sum((0, 1)), hd_s)
        inv_freq.append(backbone_inv_freq[pairs])
        kv_rows.append(g * hd + dims)
        v_rows.append(g * hd + vdims)
        for h in heads:
            q_rows.append(h * hd + dims)
            o_cols.append(h * hd + vdims)
    q_rows, kv_rows, v_rows, o_cols = (torch.cat(x) for x in (q_rows, kv_rows, v_rows, o_cols))
    # The side keeps the backbone's attention temperature: SDPA scales by hd_s^-0.5, so fold the rest into q.
    q_factor = backbone_scaling * math.sqrt(hd_s)
    attn.q_proj.weight.copy_(w.q[q_rows][:, channels] * q_factor)
    attn.k_proj.weight.copy_(w.k[kv_rows][:, channels])
    attn.v_proj.weight.copy_(w.v[v_rows][:, channels])
    attn.o_proj.weight.copy_(w.o[channels][:, o_cols])
    for proj, bias, rows in (
        (attn.q_proj, w.q_bias, q_rows),
        (attn.k_proj, w.k_bias, kv_rows),
        (attn.v_proj, w.v_bias, v_rows),
    ):
        if proj.bias is not None:
            proj.bias.copy_(
                bias[rows] * (q_factor if proj is attn.q_proj else 1.0)
                if bias is not None
                else torch.zeros_like(proj.bias)
            )
    attn.inv_freq.copy_(torch.stack(inv_freq))
    block.attn_norm.weight.copy_(w.attn_gain[channels])
    block.mlp_norm.weight.copy_(w.mlp_gain[channels])
    mlp = block.mlp
    unit_score = (
        cols(w.gate, w.mlp_gain).pow(2).sum(1) + cols(w.up, w.mlp_gain).pow(2).sum(1) + w.down[channels].pow(2).sum(0)
    )
    units = _top_sorted(unit_score, mlp.gate_proj.out_features)
    mlp.gate_proj.weight.copy_(w.gate[units][:, channels])
    mlp.up_proj.weight.copy_(w.up[units][:, channels])
    mlp.down_proj.weight.copy_(w.down[channels][:, units])


@torch.no_grad()
def load_selection_ladders_(side: SideNetwork, channels: Tensor) -> None:
    """Every ladder starts as the selection of `channels`: z = h[..., channels]."""
    for ladder in side.projections():
        ladder.zero_()
        ladder[torch.arange(len(channels)), channels] = 1.0
