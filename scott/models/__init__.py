"""Vision Transformer parts: encoder, predictor, positional embedding, the timm model family."""
from . import timm_family  # registers the scott_vit_* models with timm
from .encoder import CONTEXT_MODES, Encoder, build_encoder
from .pos_embed import sincos_2d
from .predictor import Predictor, build_predictor
from .timm_family import ScottViT

__all__ = ["Encoder", "build_encoder", "Predictor", "build_predictor", "sincos_2d", "CONTEXT_MODES", "ScottViT",
           "timm_family"]
