"""SCOTT tokenizer: a shallow conv stack computed over the visible patches only."""
from .layers import STACKS, build_stack
from .masks_util import gather_visible, mask_at, scatter_visible
from .module import BACKENDS, Tokenizer, available_backends

__all__ = ["Tokenizer", "gather_visible", "scatter_visible", "mask_at", "build_stack", "STACKS",
           "BACKENDS", "available_backends"]
