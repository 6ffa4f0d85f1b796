"""Modules: NF4 linear layers, the side network, LadderModel."""
from .config import LadderConfig
from .ladder import LadderModel, get_ladder_model
from .nf4_linear import NF4Linear, make_backbone_shardable_, patch_bnb_, quantize_model_
from .side import SideKVCache, SideNetwork

__all__ = ["NF4Linear", "quantize_model_", "patch_bnb_", "make_backbone_shardable_", "LadderConfig", "LadderModel", "get_ladder_model",
           "SideNetwork", "SideKVCache"]
