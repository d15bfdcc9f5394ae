"""Fixed 2-D sine-cosine positional embedding for a patch grid."""
from __future__ import annotations

import torch

__all__ = ["sincos_2d"]


def _sincos_1d(dim: int, pos: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[len(pos), dim]``: sines then cosines of ``pos * temperature^(-2i/dim)``."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = temperature ** -omega
    angles = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Positional embedding ``[grid_h * grid_w, dim]`` (float32) in row-major patch order.

    The first half of the channels encodes the row, the second half the column; each half is
    the 1-D sin/cos code of the transformer paper. Computed in float64, returned as float32.
    ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a width divisible by 4, got {dim}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    emb = torch.cat([_sincos_1d(dim // 2, rows, temperature), _sincos_1d(dim // 2, cols, temperature)], dim=1)
    return emb.to(torch.float32)
