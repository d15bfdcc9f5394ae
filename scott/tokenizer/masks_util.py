"""Small helpers around the patch visibility mask (an explicit ``[B, gh, gw]`` bool tensor)."""
from __future__ import annotations

import torch

__all__ = ["mask_at", "gather_visible", "scatter_visible"]


def mask_at(visible: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Upsample a patch mask ``[B, gh, gw]`` to a ``[B, 1, h, w]`` bool mask.

    ``h`` and ``w`` must be integer multiples of the grid size: each patch covers an
    ``(h / gh) x (w / gw)`` block of the layer's output.
    """
    b, gh, gw = visible.shape
    if h % gh or w % gw:
        raise ValueError(f"resolution {h}x{w} is not a multiple of the patch grid {gh}x{gw}")
    m = visible
    if h != gh:
        m = m.repeat_interleave(h // gh, dim=1)
    if w != gw:
        m = m.repeat_interleave(w // gw, dim=2)
    return m.unsqueeze(1)


def gather_visible(tokens: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the visible tokens of ``tokens [B, N, D]``.

    Returns ``(tokens_v [B, Nv, D], positions [B, Nv])`` with positions in row-major order.
    Every image must have the same number ``Nv`` of visible patches.
    """
    b, n, d = tokens.shape
    flat = visible.reshape(b, -1)
    if flat.shape[1] != n:
        raise ValueError(f"mask has {flat.shape[1]} patches per image but tokens have {n}")
    counts = flat.sum(1)
    if b and not bool((counts == counts[0]).all()):
        raise ValueError(f"gather_visible needs the same visible count in every image; got {counts.tolist()}")
    nv = int(counts[0]) if b else 0
    positions = flat.nonzero()[:, 1].reshape(b, nv).contiguous()
    gathered = tokens.gather(1, positions.unsqueeze(-1).expand(b, nv, d))
    return gathered, positions


def scatter_visible(tokens_v: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`gather_visible`: place ``[B, Nv, D]`` tokens at ``positions`` in zeros."""
    b, nv, d = tokens_v.shape
    out = tokens_v.new_zeros(b, n, d)
    return out.scatter(1, positions.unsqueeze(-1).expand(b, nv, d), tokens_v)
