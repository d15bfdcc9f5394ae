"""Dense-masked reference backend: the definition of the tokenizer's meaning.

``x = images * mask``; for every layer ``x = layer(x) * mask_at(visible, h_l, w_l)``. This is the
paper's emulation (dense compute), the test oracle of every other backend and the fastest choice
when (almost) every patch is visible.
"""
from __future__ import annotations

import torch

from ..masks_util import mask_at


def available() -> tuple[bool, str]:
    return True, ""


def run(layers, images: torch.Tensor, visible: torch.Tensor | None,
        channels_last: bool | None = None) -> torch.Tensor:
    """Return ``[B, D, gh, gw]``; ``channels_last`` defaults to True on CPU (its fastest layout)."""
    return _run(layers, images, visible, channels_last, remask=True)


def run_leaky(layers, images: torch.Tensor, visible: torch.Tensor | None,
              channels_last: bool | None = None) -> torch.Tensor:
    """The LEAKY variant the paper argues against (an ablation, not a backend of the one meaning):
    masked pixels are zeroed once, the stack runs as a plain dense convolution without re-masking
    after each layer, and only the output tokens of masked patches are zeroed. A visible token
    near a masked region then depends on the zero-filled pixels and on activations that grew
    into the masked area, so it differs from :func:`run` there."""
    return _run(layers, images, visible, channels_last, remask=False)


def _run(layers, images, visible, channels_last, remask: bool) -> torch.Tensor:
    if channels_last is None:
        channels_last = images.device.type == "cpu"
    x = images
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if visible is not None:
        x = x * mask_at(visible, x.shape[2], x.shape[3]).to(x.dtype)
    for layer in layers:
        x = layer.dense(x)
        # A 1-channel batch is NCHW and channels-last at once, so the first conv returns NCHW and
        # the CPU max-pool after it runs 7x slower; a no-op for outputs already channels-last.
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if remask and visible is not None and layer.kind != "act":
            x = x * mask_at(visible, x.shape[2], x.shape[3]).to(x.dtype)
    if not remask and visible is not None:
        x = x * mask_at(visible, x.shape[2], x.shape[3]).to(x.dtype)
    return x
