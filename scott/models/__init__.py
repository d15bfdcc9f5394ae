"""Vision Transformer parts: encoder, predictor, positional embedding."""
from .encoder import CONTEXT_MODES, Encoder, build_encoder
from .pos_embed import sincos_2d
from .predictor import Predictor, build_predictor

__all__ = ["Encoder", "build_encoder", "Predictor", "build_predictor", "sincos_2d", "CONTEXT_MODES"]
