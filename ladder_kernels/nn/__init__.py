"""Modules: NF4 linear layers, the side network, LadderModel."""
from .nf4_linear import NF4Linear, patch_bnb_, quantize_model_

__all__ = ["NF4Linear", "quantize_model_", "patch_bnb_"]
