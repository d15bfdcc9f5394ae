"""MIM-JEPA predictor: a narrow transformer that fills in the masked positions."""
from __future__ import annotations

import torch
import torch.nn as nn

from .encoder import init_transformer_, make_blocks, touch
from .pos_embed import sincos_2d

__all__ = ["Predictor", "build_predictor", "predictor_heads"]


def predictor_heads(dim: int, num_heads: int) -> int:
    """The largest head count ``<= num_heads`` that divides ``dim``."""
    for h in range(max(1, int(num_heads)), 0, -1):
        if dim % h == 0:
            return h
    return 1


class Predictor(nn.Module):
    """Narrow transformer predicting tokens (or pixels) at query positions.

    ``forward(context [B, Nc, D], context_positions [B, Nc] | None, query_positions [B, Nq] | None)``

    * ``context_positions=None``: the context holds all N positions in row-major order (the
      encoder's ``all`` mode, mask tokens already in place); with ``query_positions=None`` the
      prediction for every position is returned, ``[B, N, out_dim]``.
    * otherwise the context tokens sit at ``context_positions`` and a learnable mask token plus
      the position is appended for every query; returns ``[B, Nq, out_dim]``.

    Layout: Linear(D -> predictor_dim) + own sin-cos positions, ``depth`` blocks, then the
    paper's head SiLU -> LayerNorm -> Linear(predictor_dim -> out_dim) (``out_dim`` defaults to D).
    """

    def __init__(self, grid_size, embed_dim: int, predictor_dim: int | None = None, depth: int = 3,
                 num_heads: int = 6, mlp_ratio: float = 4.0, out_dim: int | None = None):
        super().__init__()
        dim = int(predictor_dim or embed_dim)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.dim = dim
        self.out_dim = int(out_dim or embed_dim)
        self.in_proj = nn.Linear(embed_dim, dim)
        self.register_buffer("pos_embed", sincos_2d(*self.grid_size, dim)[None], persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = make_blocks(dim, depth, predictor_heads(dim, num_heads), mlp_ratio)
        self.head = nn.Sequential(nn.SiLU(), nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, self.out_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        init_transformer_(self.blocks, self.in_proj, self.head)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Kept out of weight decay besides 1-D parameters and biases: the mask token."""
        return {"mask_token"}

    def forward(self, context: torch.Tensor, context_positions: torch.Tensor | None = None,
                query_positions: torch.Tensor | None = None) -> torch.Tensor:
        x = self.in_proj(context)
        pos = self.pos_embed[0].to(x.dtype)
        if context_positions is None:
            if x.shape[1] != self.num_patches:
                raise ValueError(f"without context_positions the context must hold all {self.num_patches} "
                                 f"positions, got {x.shape[1]}")
            x = x + pos
        else:
            x = x + pos[context_positions]
        nc = x.shape[1]
        if query_positions is not None:
            queries = self.mask_token.to(x.dtype) + pos[query_positions]
            x = torch.cat([x, queries], dim=1)
        else:
            x = touch(x, self.mask_token)
        for block in self.blocks:
            x = block(x)
        out = self.head(x)
        return out[:, nc:] if query_positions is not None else out


def build_predictor(model_cfg, grid_size, out_dim: int | None = None) -> Predictor:
    """Predictor from the recipe's ``model`` section (``predictor_depth``, ``predictor_dim``;
    typed, or a mapping completed by ``scott.config.as_section``)."""
    from scott.config import as_section

    m = as_section("model", model_cfg)
    return Predictor(grid_size, m.embed_dim, predictor_dim=m.predictor_dim, depth=m.predictor_depth,
                     num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, out_dim=out_dim)
