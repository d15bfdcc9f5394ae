"""Layer operations of the ``tiles`` backend on stacks of visible tiles ``[Nv, t, t, C]``.

Within a visible tile every site is visible, so no re-masking is ever needed: the only place the
mask acts is the halo, which is copied from VISIBLE neighbours and left at zero elsewhere. All
functions here are plain differentiable torch code except :class:`PiecesConv`, a hand-written
autograd function (tested against autograd in ``tests/test_tiles_internals.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._tiles_grid import TileGrid, span

__all__ = ["pad_tiles", "halo_pad", "halo_unpad", "conv_im2col", "conv_from_image", "maxpool_tiles",
           "blur", "blur_tiles", "MaxPoolTiles", "BlurTiles", "PiecesConv",
           "conv_pieces", "pieces_plan", "tiles_to_grid"]


def _directions(before: int, after: int, t: int) -> range:
    return range(-math.ceil(before / t), math.ceil(after / t) + 1)


def pad_tiles(x: torch.Tensor, grid: TileGrid, before: int, after: int) -> torch.Tensor:
    """Tiles ``[Nv, t, t, C]`` -> ``[Nv, t+before+after, ...]`` with halos from visible neighbours."""
    n, t, _, c = x.shape
    if before == 0 and after == 0:
        return x
    size = t + before + after
    out = x.new_zeros(n, size, size, c)
    dirs = _directions(before, after, t)
    for dy in dirs:
        rs = span(-before, t + after, t, dy)
        if rs is None:
            continue
        py = rs[0] + dy * t + before
        for dx in dirs:
            cs = span(-before, t + after, t, dx)
            if cs is None:
                continue
            px = cs[0] + dx * t + before
            rows = slice(py, py + rs[1] - rs[0])
            cols = slice(px, px + cs[1] - cs[0])
            if dy == 0 and dx == 0:
                out[:, rows, cols] = x
                continue
            centre, nb = grid.pairs(dy, dx)
            if centre.numel():
                out[centre, rows, cols] = x[nb, rs[0]:rs[1], cs[0]:cs[1]]
    return out


def conv_im2col(xp: torch.Tensor, conv) -> torch.Tensor:
    """Valid convolution of halo-padded tiles ``[Nv, T, T, C]`` -> ``[Nv, to, to, out]`` (one GEMM)."""
    n = xp.shape[0]
    k, s = conv.k, conv.s
    cols = xp.unfold(1, k, s).unfold(2, k, s)  # [Nv, to, to, C, k, k]
    to = cols.shape[1]
    a = cols.reshape(n * to * to, -1)
    w = conv.weight.reshape(conv.out_channels, -1)
    y = torch.mm(a, w.t()) if conv.bias is None else torch.addmm(conv.bias, a, w.t())
    return y.view(n, to, to, conv.out_channels)


def conv_from_image(images: torch.Tensor, grid: TileGrid, conv) -> torch.Tensor:
    """First conv of a stack straight from the images: the masked, padded image is cut into
    visible tiles with their halo (masked neighbours are zeros already) and one valid conv2d
    runs on that stack. Returns ``[Nv, to, to, out]``."""
    b, c, h, w = images.shape
    p = h // grid.gh
    m = grid.visible.repeat_interleave(p, 1).repeat_interleave(p, 2)
    x = images * m.unsqueeze(1).to(images.dtype)
    before, after = conv.p, max(0, conv.k - conv.s - conv.p)
    if before or after:
        x = F.pad(x, (before, after, before, after))
    size = p + before + after
    tiles = x.unfold(2, size, p).unfold(3, size, p)  # [B, C, gh, gw, size, size]
    tiles = tiles.permute(0, 2, 3, 1, 4, 5)[grid.b, grid.gy, grid.gx]  # [Nv, C, size, size]
    tiles = tiles.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(tiles, conv.weight, conv.bias, conv.s)
    return y.permute(0, 2, 3, 1)


def _halo_regions(t: int, before: int, after: int):
    """``(dy, dx, rows_in_padded, cols_in_padded, rows_in_neighbour, cols_in_neighbour)`` for
    every neighbour direction a halo of ``before``/``after`` sites reaches (centre included)."""
    dirs = _directions(before, after, t)
    out = []
    for dy in dirs:
        rs = span(-before, t + after, t, dy)
        if rs is None:
            continue
        py = rs[0] + dy * t + before
        for dx in dirs:
            cs = span(-before, t + after, t, dx)
            if cs is None:
                continue
            px = cs[0] + dx * t + before
            out.append((dy, dx, slice(py, py + rs[1] - rs[0]), slice(px, px + cs[1] - cs[0]),
                        slice(*rs), slice(*cs)))
    return out


def halo_pad(x: torch.Tensor, grid: TileGrid, before: int, after: int) -> torch.Tensor:
    """Non-differentiable :func:`pad_tiles` (used inside the hand-written autograd functions)."""
    n, t, _, c = x.shape
    size = t + before + after
    out = x.new_empty(n, size, size, c)
    for dy, dx, pr, pc, nr, nc in _halo_regions(t, before, after):
        if dy == 0 and dx == 0:
            out[:, pr, pc] = x
            continue
        centre, nb = grid.pairs(dy, dx)
        region = out[:, pr, pc]
        if centre.numel() == n:
            region.copy_(x[nb, nr, nc])
        else:
            region.zero_()
            if centre.numel():
                region[centre] = x[nb, nr, nc]
    return out


def halo_unpad(gp: torch.Tensor, grid: TileGrid, before: int, after: int, t: int) -> torch.Tensor:
    """Adjoint of :func:`halo_pad`: gradient of padded tiles -> gradient of the tiles."""
    regions = _halo_regions(t, before, after)
    gx = None
    for dy, dx, pr, pc, nr, nc in regions:
        if dy == 0 and dx == 0:
            gx = gp[:, pr, pc].clone(memory_format=torch.contiguous_format)
    for dy, dx, pr, pc, nr, nc in regions:
        if dy == 0 and dx == 0:
            continue
        centre, nb = grid.pairs(dy, dx)
        if centre.numel():
            gx[:, nr, nc].index_add_(0, nb, gp[centre, pr, pc])
    return gx


class MaxPoolTiles(torch.autograd.Function):
    """Max-pool k2 s1 (zero pad after) of tiles. Ties go to the first element in row-major
    window order, as in ``F.max_pool2d``, so gradients equal the dense reference's."""

    @staticmethod
    def forward(ctx, x, grid):
        xp = halo_pad(x, grid, 0, 1)
        left, right = xp[:, :, :-1], xp[:, :, 1:]
        # 1.0 where the later element wins (strictly greater); float masks, as bool
        # where/masked_fill are several times slower than a multiply on CPU
        hsel = (right > left).to(x.dtype)
        hmax = torch.maximum(left, right)
        top, bottom = hmax[:, :-1], hmax[:, 1:]
        vsel = (bottom > top).to(x.dtype)
        ctx.save_for_backward(hsel, vsel)
        ctx.grid, ctx.t = grid, x.shape[1]
        return torch.maximum(top, bottom)

    @staticmethod
    def backward(ctx, g):
        hsel, vsel = ctx.saved_tensors
        n, t, _, c = g.shape
        gh = g.new_empty(n, t + 1, t, c)
        gh[:, t].zero_()
        moved = g * vsel
        gh[:, :t] = g - moved
        gh[:, 1:] += moved
        gp = g.new_empty(n, t + 1, t + 1, c)
        gp[:, :, t].zero_()
        moved = gh * hsel
        gp[:, :, :t] = gh - moved
        gp[:, :, 1:] += moved
        return halo_unpad(gp, ctx.grid, 0, 1, ctx.t), None


def _blur_axis(x: torch.Tensor, dim: int, stride: int) -> torch.Tensor:
    """Valid [1, 2, 1] / 4 filter along ``dim`` with ``stride``."""
    to = (x.shape[dim] - 3) // stride + 1
    end = (to - 1) * stride + 1
    a = x.narrow(dim, 0, end)[_every(dim, stride)]
    b = x.narrow(dim, 1, end)[_every(dim, stride)]
    c = x.narrow(dim, 2, end)[_every(dim, stride)]
    return (a + c) * 0.25 + b * 0.5


def _blur_axis_t(g: torch.Tensor, dim: int, stride: int, size: int) -> torch.Tensor:
    """Adjoint of :func:`_blur_axis` for an input of ``size`` along ``dim``."""
    to = g.shape[dim]
    end = (to - 1) * stride + 1
    shape = list(g.shape)
    shape[dim] = size
    out = g.new_zeros(shape)
    q = g * 0.25
    out.narrow(dim, 0, end)[_every(dim, stride)] += q
    out.narrow(dim, 2, end)[_every(dim, stride)] += q
    out.narrow(dim, 1, end)[_every(dim, stride)] += g * 0.5
    return out


def _every(dim: int, stride: int):
    return (slice(None),) * dim + (slice(None, None, stride),)


def blur_tiles(xp: torch.Tensor, stride: int) -> torch.Tensor:
    """Binomial 3x3 blur of halo-padded tiles (valid), separable, with the given stride."""
    return _blur_axis(_blur_axis(xp, 1, stride), 2, stride)


class BlurTiles(torch.autograd.Function):
    """Binomial blur (zero pad 1, stride 1 or 2) of tiles, halo from visible neighbours."""

    @staticmethod
    def forward(ctx, x, grid, stride):
        after = 0 if stride == 2 else 1
        xp = halo_pad(x, grid, 1, after)
        ctx.grid, ctx.stride, ctx.t, ctx.after = grid, stride, x.shape[1], after
        return blur_tiles(xp, stride)

    @staticmethod
    def backward(ctx, g):
        t, s, after = ctx.t, ctx.stride, ctx.after
        size = t + 1 + after
        gr = _blur_axis_t(g, 2, s, size)
        gp = _blur_axis_t(gr, 1, s, size)
        return halo_unpad(gp, ctx.grid, 1, after, t), None, None


def maxpool_tiles(x: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    return MaxPoolTiles.apply(x, grid)


def blur(x: torch.Tensor, grid: TileGrid, stride: int) -> torch.Tensor:
    return BlurTiles.apply(x, grid, stride)


def tiles_to_grid(x: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Final ``[Nv, 1, 1, D]`` tiles -> ``[B, D, gh, gw]`` with zeros at masked patches."""
    d = x.shape[-1]
    out = x.new_zeros(grid.batch * grid.gh * grid.gw, d)
    out = out.index_copy(0, grid.flat_index, x.reshape(grid.count, d))
    return out.view(grid.batch, grid.gh, grid.gw, d).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- GEMM pieces conv

class _Piece:
    """One GEMM of a pieces conv: the pixels ``rows x cols`` of the neighbour ``(dy, dx)``
    times the taps they meet for output rows ``out_rows`` and columns ``out_cols``."""

    __slots__ = ("dy", "dx", "rows", "cols", "out_rows", "out_cols", "taps_y", "taps_x")

    def __init__(self, dy, dx, rows, cols, out_rows, out_cols, taps_y, taps_x):
        self.dy, self.dx = dy, dx
        self.rows, self.cols = rows, cols            # (start, stop) in the neighbour tile
        self.out_rows, self.out_cols = out_rows, out_cols  # (start, stop) output positions
        self.taps_y, self.taps_x = taps_y, taps_x    # first kernel tap for each output row/col


def _axis_groups(t: int, to: int, k: int, s: int, p: int):
    """For each neighbour offset d along one axis: runs of consecutive output positions that
    read the same input range of that neighbour, with the first tap of each position."""
    radius = max(math.ceil(p / t), math.ceil(max(0, k - s - p) / t))
    groups = {}
    for d in range(-radius, radius + 1):
        runs = []
        for i in range(to):
            rng = span(s * i - p, s * i - p + k, t, d)
            if rng is None:
                continue
            tap = rng[0] + d * t - (s * i - p)
            if runs and runs[-1][0] == rng and runs[-1][2] == i:
                runs[-1][2] = i + 1
                runs[-1][3].append(tap)
            else:
                runs.append([rng, i, i + 1, [tap]])
        if runs:
            groups[d] = runs
    return groups


def pieces_plan(t: int, k: int, s: int, p: int) -> list[_Piece]:
    """All GEMM pieces of a conv (kernel k, stride s, pad p) on input tiles of size t."""
    to = t // s
    ax = _axis_groups(t, to, k, s, p)
    plan = []
    for dy, yruns in ax.items():
        for dx, xruns in ax.items():
            for (rr, i0, i1, ty) in yruns:
                for (cr, j0, j1, tx) in xruns:
                    plan.append(_Piece(dy, dx, rr, cr, (i0, i1), (j0, j1), ty, tx))
    return plan


def _piece_weight(w: torch.Tensor, pc: _Piece) -> torch.Tensor:
    """``[rows*cols*C, out_rows*out_cols*D]`` weight of a piece from ``w [D, C, k, k]``."""
    hr, hc = pc.rows[1] - pc.rows[0], pc.cols[1] - pc.cols[0]
    blocks = []
    for ty in pc.taps_y:
        for tx in pc.taps_x:
            blocks.append(w[:, :, ty:ty + hr, tx:tx + hc])  # [D, C, hr, hc]
    wb = torch.stack(blocks, 0)  # [G, D, C, hr, hc]
    return wb.permute(3, 4, 2, 0, 1).reshape(hr * hc * w.shape[1], -1)


def _is_whole(pc: _Piece, t: int, to: int) -> bool:
    return (pc.dy == 0 and pc.dx == 0 and pc.rows == (0, t) and pc.cols == (0, t)
            and pc.out_rows == (0, to) and pc.out_cols == (0, to))


class PiecesConv(torch.autograd.Function):
    """Submanifold conv of tiles as GEMM pieces: each neighbour direction contributes only the
    taps that land in it, and only for tiles whose neighbour there is visible."""

    @staticmethod
    def forward(ctx, x, weight, bias, grid, plan):
        n, t, _, c = x.shape
        d = weight.shape[0]
        to = max(pc.out_rows[1] for pc in plan)
        wps = [_piece_weight(weight, pc) for pc in plan]
        y = None
        for pc, wp in zip(plan, wps):
            if _is_whole(pc, t, to):
                y = torch.mm(x.reshape(n, -1), wp).view(n, to, to, d)
                break
        if y is None:
            y = x.new_zeros(n, to, to, d)
        for pc, wp in zip(plan, wps):
            if _is_whole(pc, t, to):
                continue
            if pc.dy == 0 and pc.dx == 0:
                a = x[:, pc.rows[0]:pc.rows[1], pc.cols[0]:pc.cols[1]].reshape(n, -1)
                r = torch.mm(a, wp)
                y[:, pc.out_rows[0]:pc.out_rows[1], pc.out_cols[0]:pc.out_cols[1]] += r.view(
                    n, pc.out_rows[1] - pc.out_rows[0], pc.out_cols[1] - pc.out_cols[0], d)
                continue
            centre, nb = grid.pairs(pc.dy, pc.dx)
            if centre.numel() == 0:
                continue
            a = x[nb, pc.rows[0]:pc.rows[1], pc.cols[0]:pc.cols[1]].reshape(nb.numel(), -1)
            r = torch.mm(a, wp)
            y[:, pc.out_rows[0]:pc.out_rows[1], pc.out_cols[0]:pc.out_cols[1]].index_add_(
                0, centre, r.view(nb.numel(), pc.out_rows[1] - pc.out_rows[0],
                                  pc.out_cols[1] - pc.out_cols[0], d))
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, weight)
        ctx.grid, ctx.plan, ctx.has_bias = grid, plan, bias is not None
        ctx.wps = wps
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        grid, plan = ctx.grid, ctx.plan
        n, t, _, c = x.shape
        d = weight.shape[0]
        to = gy.shape[1]
        gy = gy.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = x.new_zeros(x.shape) if need_x else None
        gw = torch.zeros_like(weight) if need_w else None
        for pc, wp in zip(plan, ctx.wps):
            hr, hc = pc.rows[1] - pc.rows[0], pc.cols[1] - pc.cols[0]
            orr, occ = pc.out_rows, pc.out_cols
            whole = _is_whole(pc, t, to)
            if pc.dy == 0 and pc.dx == 0:
                centre = nb = None
                m = n
                g = gy.view(n, -1) if whole else gy[:, orr[0]:orr[1], occ[0]:occ[1]].reshape(n, -1)
                a = x.view(n, -1) if whole else x[:, pc.rows[0]:pc.rows[1], pc.cols[0]:pc.cols[1]].reshape(n, -1)
            else:
                centre, nb = grid.pairs(pc.dy, pc.dx)
                m = nb.numel()
                if m == 0:
                    continue
                g = gy[centre, orr[0]:orr[1], occ[0]:occ[1]].reshape(m, -1)
                a = x[nb, pc.rows[0]:pc.rows[1], pc.cols[0]:pc.cols[1]].reshape(m, -1) if need_w else None
            if need_x:
                ga = torch.mm(g, wp.t()).view(m, hr, hc, c)
                if nb is None:
                    gx[:, pc.rows[0]:pc.rows[1], pc.cols[0]:pc.cols[1]] += ga
                else:
                    gx[:, pc.rows[0]:pc.rows[1], pc.cols[0]:pc.cols[1]].index_add_(0, nb, ga)
            if need_w:
                gwp = torch.mm(a.t(), g)  # [hr*hc*C, G*D]
                gwp = gwp.view(hr, hc, c, len(pc.taps_y), len(pc.taps_x), d)
                for iy, ty in enumerate(pc.taps_y):
                    for ix, tx in enumerate(pc.taps_x):
                        gw[:, :, ty:ty + hr, tx:tx + hc] += gwp[:, :, :, iy, ix].permute(3, 2, 0, 1)
        gb = gy.sum((0, 1, 2)) if (need_b and ctx.has_bias) else None
        return gx, gw, gb, None, None


def conv_pieces(x: torch.Tensor, grid: TileGrid, conv, plan) -> torch.Tensor:
    return PiecesConv.apply(x, conv.weight, conv.bias, grid, plan)
