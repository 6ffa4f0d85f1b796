"""Modules: NF4 linear layers, the side network, LadderModel."""

from ladder_kernels.nn.config import LadderConfig
from ladder_kernels.nn.ladder import LadderModel, get_ladder_model
from ladder_kernels.nn.nf4_linear import NF4Linear, make_backbone_shardable_, patch_bnb_, quantize_model_
from ladder_kernels.nn.side import SideKVCache, SideNetwork

__all__ = [
    "NF4Linear",
    "quantize_model_",
    "patch_bnb_",
    "make_backbone_shardable_",
    "LadderConfig",
    "LadderModel",
    "get_ladder_model",
    "SideNetwork",
    "SideKVCache",
]
