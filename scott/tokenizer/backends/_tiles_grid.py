"""Bookkeeping of the ``tiles`` backend: which patches are visible and who their neighbours are.

Every layer's activation is held as a stack of visible tiles ``[Nv, t, t, C]`` (one tile per
visible patch, channels-last, patches in row-major ``(b, gy, gx)`` order). A tile's neighbour in
direction ``(dy, dx)`` is the tile of patch ``(b, gy + dy, gx + dx)``; it exists only when that
patch is inside the image and visible (masked or outside neighbours are zeros).
"""
from __future__ import annotations

import torch

__all__ = ["TileGrid", "halo_of", "span"]


class TileGrid:
    """Visible patches of a ``[B, gh, gw]`` mask and a cache of neighbour pairs per direction."""

    def __init__(self, visible: torch.Tensor):
        self.visible = visible
        self.batch, self.gh, self.gw = visible.shape
        flat = visible.reshape(-1)
        #: flat patch index (b * gh * gw + gy * gw + gx) of every visible tile, row-major
        self.flat_index = flat.nonzero().reshape(-1)
        self.count = int(self.flat_index.numel())
        gw, ghw = self.gw, self.gh * self.gw
        self.b = self.flat_index // ghw
        rem = self.flat_index - self.b * ghw
        self.gy = rem // gw
        self.gx = rem - self.gy * gw
        lut = torch.full((flat.numel(),), -1, dtype=torch.long, device=visible.device)
        lut[self.flat_index] = torch.arange(self.count, device=visible.device)
        self._lut = lut.view(self.batch, self.gh, self.gw)
        self._pairs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._table: dict[tuple[int, int], torch.Tensor] = {}
        #: index plans the ops build from this grid (e.g. halo gathers), kept for its lifetime
        #: so that a forward and its backward share them
        self.memo: dict = {}

    def neighbour(self, dy: int, dx: int) -> torch.Tensor:
        """``[Nv]`` index of each tile's neighbour in direction ``(dy, dx)``, ``-1`` if none."""
        key = (dy, dx)
        if key not in self._table:
            y = self.gy + dy
            x = self.gx + dx
            inside = (y >= 0) & (y < self.gh) & (x >= 0) & (x < self.gw)
            nb = self._lut[self.b, y.clamp(0, self.gh - 1), x.clamp(0, self.gw - 1)]
            self._table[key] = torch.where(inside, nb, torch.full_like(nb, -1))
        return self._table[key]

    def pairs(self, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centre, neighbour)``: tiles whose neighbour ``(dy, dx)`` is visible, and that neighbour."""
        key = (dy, dx)
        if key not in self._pairs:
            nb = self.neighbour(dy, dx)
            centre = (nb >= 0).nonzero().reshape(-1)
            self._pairs[key] = (centre, nb[centre])
        return self._pairs[key]


def halo_of(layer) -> tuple[int, int]:
    """Input rows/columns ``(before, after)`` a layer needs around a tile's own footprint."""
    kind = layer.kind
    if kind == "act":
        return 0, 0
    if kind == "conv":
        return layer.p, max(0, layer.k - layer.s - layer.p)
    if kind == "maxpool":
        return 0, 1
    if kind == "blur":
        return 1, 0 if layer.s == 2 else 1
    raise ValueError(f"tiles backend: unknown layer kind {kind!r}")


def span(lo: int, hi: int, t: int, d: int) -> tuple[int, int] | None:
    """Part of the relative range ``[lo, hi)`` that falls in the tile at offset ``d`` (tile size
    ``t``), as a range local to that tile, or None when they do not meet."""
    a, b = max(lo, d * t), min(hi, d * t + t)
    if a >= b:
        return None
    return a - d * t, b - d * t
