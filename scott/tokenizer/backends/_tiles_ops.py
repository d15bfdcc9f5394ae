"""Layer operations of the ``tiles`` backend on stacks of visible tiles ``[Nv, t, t, C]``.

Within a visible tile every site is visible, so no re-masking is ever needed: the only place the
mask acts is the halo, which is copied from VISIBLE neighbours and left at zero elsewhere.
Everything is differentiable torch code except two hand-written autograd functions:
:class:`HaloPad` (THE halo gather, :func:`pad_tiles`; its backward is the adjoint scatter-add)
and :class:`PiecesConv` (the submanifold conv as GEMM pieces), both tested in
``tests/test_tiles_internals.py`` and ``tests/test_tiles_ops.py``. Both keep the tensors their
backward needs through ``ctx.save_for_backward`` (version checks, saved-tensor hooks, freed
after backward); only plain Python values (ints, slices, the pieces' geometry) live on ``ctx``.
Max-pool and blur run the same native kernels as the dense reference on halo-padded tiles; the
blur's taps come from the :class:`~scott.tokenizer.layers.Blur` module itself.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._tiles_grid import TileGrid, span

__all__ = ["pad_tiles", "halo_pad", "halo_unpad", "halo_plan", "HaloPad", "conv_im2col",
           "conv_from_image", "maxpool_tiles", "blur", "PiecesConv", "gemm", "gemm_path",
           "forced_gemm_path", "onednn_gemm_agrees", "conv_pieces", "pieces_plan", "tiles_to_grid"]


# --------------------------------------------------------------------------- GEMM
#
# ``torch.mm`` is the reference. oneDNN's fp32 linear kernel (``torch.ops.mkldnn._linear_pointwise``,
# a PRIVATE op) runs GEMMs with AVX-512 where MKL's sgemm may not (on the AMD EPYC development
# machine ~2x faster; on Intel CPUs about equal). It is used only when a probe, run once per
# process, finds that it exists and gives torch.mm's numbers on the operand layouts used here,
# so a torch upgrade that changes or removes it falls back to torch.mm instead of breaking.

GEMM_PATHS = ("mm", "onednn")
_forced_path: str | None = None


def _onednn_linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.t()`` with oneDNN's fp32 linear (private op: only behind the probe)."""
    return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")


def _dense2d(m: torch.Tensor) -> torch.Tensor:
    return m if (m.is_contiguous() or m.t().is_contiguous()) else m.contiguous()


def _onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # oneDNN is fast on dense or transposed-dense operands; others are copied first
    return _onednn_linear(_dense2d(a), _dense2d(b.t()))


def _layouts(a: torch.Tensor, b: torch.Tensor):
    """``(a, b)`` in every layout :func:`gemm` meets: dense, and either one a transposed view."""
    return ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t()))


@functools.cache
def onednn_gemm_agrees() -> bool:
    """Whether the private oneDNN linear op exists here AND gives ``torch.mm``'s numbers (run once).

    Two checks on every operand layout :func:`gemm` passes it: integer-valued operands, where
    every product and partial sum is exact in fp32 so any correct GEMM must return torch.mm's
    very bits; and random operands, where both must stay within fp32's error bound of the
    float64 product (rejects reduced-precision internals such as bf16 or TF32)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        ints = (torch.randint(-8, 9, (67, 45), generator=gen).float(),
                torch.randint(-8, 9, (45, 33), generator=gen).float())
        rand = (torch.randn(130, 300, generator=gen), torch.randn(300, 70, generator=gen))
        for a, b in _layouts(*ints):
            got = _onednn_mm(a, b)
            if (got.dtype != torch.float32 or not got.is_contiguous()
                    or not torch.equal(got, torch.mm(a, b))):
                return False
        for a, b in _layouts(*rand):
            got, ref = _onednn_mm(a, b), torch.mm(a.double(), b.double())
            bound = a.shape[1] * torch.finfo(torch.float32).eps * torch.mm(a.abs(), b.abs()).double()
            for out in (got, torch.mm(a, b)):
                if out.shape != ref.shape or not bool(((out.double() - ref).abs() <= bound).all()):
                    return False
        return True
    except Exception:  # noqa: BLE001 - missing, renamed or failing op: not usable
        return False


def gemm_path() -> str:
    """The GEMM path float32 CPU GEMMs take: ``"onednn"`` when :func:`onednn_gemm_agrees`, else
    ``"mm"`` (or the one forced by :func:`forced_gemm_path`)."""
    if _forced_path is not None:
        return _forced_path
    return "onednn" if onednn_gemm_agrees() else "mm"


@contextlib.contextmanager
def forced_gemm_path(path: str):
    """Force one GEMM path inside the block (for tests and benchmarks)."""
    global _forced_path
    if path not in GEMM_PATHS:
        raise ValueError(f"GEMM path must be one of {GEMM_PATHS}, got {path!r}")
    if path == "onednn" and not onednn_gemm_agrees():
        raise RuntimeError("oneDNN's linear op is unavailable or disagrees with torch.mm here")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors (either may be a transposed view), exact to fp rounding;
    float32 CPU GEMMs take :func:`gemm_path`, everything else ``torch.mm``."""
    if a.dtype == torch.float32 and a.device.type == "cpu" and gemm_path() == "onednn":
        return _onednn_mm(a, b)
    return torch.mm(a, b)


# --------------------------------------------------------------------------- halo gather

def _directions(before: int, after: int, t: int) -> range:
    return range(-math.ceil(before / t), math.ceil(after / t) + 1)


class HaloPlan(NamedTuple):
    """Index plan of one halo gather of ``t x t`` tiles into ``size x size`` padded tiles.

    ``centre``: where a tile's own sites go; ``blank``: halo regions some tile has no visible
    neighbour for (zeroed in every tile before the copy); ``dst`` / ``src``: flat rows of the
    padded ``[Nv * size * size, C]`` and tile ``[Nv * t * t, C]`` views, every direction's
    visible pairs concatenated (one gather, one copy)."""

    t: int
    size: int
    centre: tuple[slice, slice]
    blank: tuple[tuple[slice, slice], ...]
    dst: torch.Tensor
    src: torch.Tensor


def halo_plan(grid: TileGrid, t: int, before: int, after: int) -> HaloPlan:
    """The :class:`HaloPlan` of ``grid`` for one tile size and halo (built once per grid)."""
    key = ("halo", t, before, after)
    plan = grid.memo.get(key)
    if plan is None:
        plan = grid.memo[key] = _build_halo_plan(grid, t, before, after)
    return plan


def _build_halo_plan(grid: TileGrid, t: int, before: int, after: int) -> HaloPlan:
    size = t + before + after
    dev = grid.visible.device
    centre_region, blank, dst, src = None, [], [], []
    for dy, dx, pr, pc, nr, nc in _halo_regions(t, before, after):
        if dy == 0 and dx == 0:
            centre_region = (pr, pc)
            continue
        centre, nb = grid.pairs(dy, dx)
        if centre.numel() < grid.count:
            blank.append((pr, pc))
        if centre.numel():
            dst.append(_flat_rows(centre, _rect(pr, pc, size, dev), size * size))
            src.append(_flat_rows(nb, _rect(nr, nc, t, dev), t * t))

    def cat(parts):
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=dev)

    return HaloPlan(t, size, centre_region, tuple(blank), cat(dst), cat(src))


def _gather(x: torch.Tensor, plan: HaloPlan, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    n, c = x.shape[0], x.shape[-1]
    out = x.new_empty(n, plan.size, plan.size, c)
    out[:, plan.centre[0], plan.centre[1]] = x
    for rows, cols in plan.blank:
        out[:, rows, cols] = 0
    if dst.numel():
        out.view(-1, c).index_copy_(0, dst, x.view(-1, c).index_select(0, src))
    return out


def _scatter(gp: torch.Tensor, plan: HaloPlan, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    c = gp.shape[-1]
    gx = gp[:, plan.centre[0], plan.centre[1]].clone(memory_format=torch.contiguous_format)
    if dst.numel():
        gx.view(-1, c).index_add_(0, src, gp.reshape(-1, c).index_select(0, dst))
    return gx


def halo_pad(x: torch.Tensor, grid: TileGrid, before: int, after: int) -> torch.Tensor:
    """Tiles ``[Nv, t, t, C]`` -> ``[Nv, t+before+after, ...]`` with halos from visible
    neighbours (zeros elsewhere), without autograd; :func:`pad_tiles` is its differentiable form.

    Halo strips are moved with one flat row gather/copy (``index_select`` / ``index_copy_`` on
    ``[pixels, C]`` views), several times faster than advanced indexing of strided views."""
    plan = halo_plan(grid, x.shape[1], before, after)
    return _gather(x, plan, plan.dst, plan.src)


def halo_unpad(gp: torch.Tensor, grid: TileGrid, before: int, after: int, t: int) -> torch.Tensor:
    """Adjoint of :func:`halo_pad`: gradient of padded tiles -> gradient of the tiles."""
    plan = halo_plan(grid, t, before, after)
    return _scatter(gp, plan, plan.dst, plan.src)


class HaloPad(torch.autograd.Function):
    """Differentiable :func:`halo_pad`: ``[Nv, t, t, C] -> [Nv, t+before+after, ..., C]``."""

    @staticmethod
    def forward(ctx, x, grid, before, after):
        plan = halo_plan(grid, x.shape[1], before, after)
        ctx.save_for_backward(plan.dst, plan.src)
        ctx.plan = plan._replace(dst=None, src=None)  # geometry only: ints and slices
        return _gather(x, plan, plan.dst, plan.src)

    @staticmethod
    def backward(ctx, g):
        dst, src = ctx.saved_tensors
        return _scatter(g.contiguous(), ctx.plan, dst, src), None, None, None


def pad_tiles(x: torch.Tensor, grid: TileGrid, before: int, after: int) -> torch.Tensor:
    """The halo gather (differentiable): tiles ``[Nv, t, t, C]`` -> ``[Nv, t+before+after, ...]``
    with halos from visible neighbours and zeros elsewhere."""
    if before == 0 and after == 0:
        return x
    return HaloPad.apply(x, grid, before, after)


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


def conv_from_image(images: torch.Tensor, grid: TileGrid, conv, extend: int = 0) -> torch.Tensor:
    """First conv of a stack straight from the images: the masked, padded image is cut into
    visible tiles with their halo (masked neighbours are zeros already) and one valid conv2d
    runs on that stack. Returns ``[Nv, to + extend, to + extend, out]``.

    ``extend`` > 0 also computes the first ``extend`` output rows/columns of the down, right and
    down-right neighbours (the halo a following max-pool needs), so no halo gather is needed:
    where that neighbour is visible they equal its own outputs (same window of the same masked
    image), where it is masked or outside they are set to zero, as the dense reference does."""
    b, c, h, w = images.shape
    p = h // grid.gh
    m = grid.visible.repeat_interleave(p, 1).repeat_interleave(p, 2)
    x = images * m.unsqueeze(1).to(images.dtype)
    before, after = conv.p, max(0, conv.k - conv.s - conv.p) + extend * conv.s
    if before or after:
        x = F.pad(x, (before, after, before, after))
    size = p + before + after
    tiles = x.unfold(2, size, p).unfold(3, size, p)  # [B, C, gh, gw, size, size]
    tiles = tiles.permute(0, 2, 3, 1, 4, 5)[grid.b, grid.gy, grid.gx]  # [Nv, C, size, size]
    tiles = tiles.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(tiles, conv.weight, conv.bias, conv.s).permute(0, 2, 3, 1)
    if extend:
        y = y * _keep_extension(grid, y.shape[1] - extend, extend, y.dtype)
    return y


def _keep_extension(grid: TileGrid, t: int, extend: int, dtype) -> torch.Tensor:
    """``[Nv, t+e, t+e, 1]``: 1 on a tile and on the extension sites of its visible down/right
    neighbours, 0 on extension sites of masked or outside ones."""
    size = t + extend
    keep = torch.ones(grid.count, size, size, 1, dtype=dtype, device=grid.visible.device)
    for dy, dx in ((1, 0), (0, 1), (1, 1)):
        missing = (grid.neighbour(dy, dx) < 0).nonzero().reshape(-1)
        if missing.numel():
            rows = slice(t, size) if dy else slice(0, t)
            cols = slice(t, size) if dx else slice(0, t)
            keep[missing, rows, cols] = 0
    return keep


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


def _rect(rows: slice | tuple, cols: slice | tuple, width: int, device) -> torch.Tensor:
    """Row-major pixel offsets of a rectangle inside a tile of the given width."""
    r0, r1 = (rows.start, rows.stop) if isinstance(rows, slice) else rows
    c0, c1 = (cols.start, cols.stop) if isinstance(cols, slice) else cols
    r = torch.arange(r0, r1, device=device)
    c = torch.arange(c0, c1, device=device)
    return (r[:, None] * width + c[None, :]).reshape(-1)


def _flat_rows(tiles: torch.Tensor, pixels: torch.Tensor, tile_pixels: int) -> torch.Tensor:
    """Rows of a ``[Nv * tile_pixels, C]`` view: every pixel of ``pixels`` in every tile."""
    return (tiles[:, None] * tile_pixels + pixels[None, :]).reshape(-1)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """``[N, H, W, C]`` tiles as an NCHW tensor in channels-last memory (a view)."""
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def maxpool_tiles(x: torch.Tensor, grid: TileGrid, padded: bool = False) -> torch.Tensor:
    """Max-pool k2 s1 (zero pad after) of tiles, the same kernel as the dense reference (so ties
    resolve identically). ``padded``: ``x`` already carries its one-site halo after."""
    xp = x if padded else pad_tiles(x, grid, 0, 1)
    return _nhwc(F.max_pool2d(_nchw(xp), 2, 1))


def blur(x: torch.Tensor, grid: TileGrid, layer) -> torch.Tensor:
    """``layer`` (a :class:`~scott.tokenizer.layers.Blur`: its taps, zero pad 1, stride 1 or 2)
    on tiles, as the same depthwise conv as its dense form."""
    after = 0 if layer.s == 2 else 1
    kernel = layer.kernel(x.shape[-1], x.dtype).contiguous()
    xp = pad_tiles(x, grid, 1, after)
    return _nhwc(F.conv2d(_nchw(xp), kernel, None, layer.s, 0, 1, x.shape[-1]))


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


def _piece_weight(wdkkc: torch.Tensor, pc: _Piece) -> torch.Tensor:
    """``[G*D, rows*cols*C]`` (transposed) weight of a piece from the weight in ``[D, k, k, C]``
    layout; row block ``g`` (output position ``g`` of the piece, row-major) holds its taps."""
    hr, hc = pc.rows[1] - pc.rows[0], pc.cols[1] - pc.cols[0]
    blocks = [wdkkc[:, ty:ty + hr, tx:tx + hc] for ty in pc.taps_y for tx in pc.taps_x]
    wb = blocks[0] if len(blocks) == 1 else torch.cat(blocks, 0)  # [G*D, hr, hc, C]
    return wb.reshape(wb.shape[0], -1)


def _is_whole(pc: _Piece, t: int, to: int) -> bool:
    return (pc.dy == 0 and pc.dx == 0 and pc.rows == (0, t) and pc.cols == (0, t)
            and pc.out_rows == (0, to) and pc.out_cols == (0, to))


class PiecesConv(torch.autograd.Function):
    """Submanifold conv of tiles as GEMM pieces: each neighbour direction contributes only the
    taps that land in it, and only for tiles whose neighbour there is visible (masked
    neighbours' zeros are skipped, not multiplied). Inputs are gathered and partial sums
    scattered with flat row indices (``[pixels, C]`` views). Once differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, grid, plan):
        x = x.contiguous()
        n, t, _, c = x.shape
        d = weight.shape[0]
        to = max(pc.out_rows[1] for pc in plan)
        dev = x.device
        wk = weight.permute(0, 2, 3, 1).contiguous()  # [D, k, k, C]
        xrows = x.reshape(-1, c)
        pieces = []  # (piece, input rows or None, output rows or None, a, weight)
        y = None
        for pc in plan:
            whole = _is_whole(pc, t, to)
            if whole:
                src = dst = None
                a = x.reshape(n, -1)
            else:
                if pc.dy == 0 and pc.dx == 0:
                    centre = nb = torch.arange(n, device=dev)
                else:
                    centre, nb = grid.pairs(pc.dy, pc.dx)
                    if centre.numel() == 0:
                        continue
                src = _flat_rows(nb, _rect(pc.rows, pc.cols, t, dev), t * t)
                dst = _flat_rows(centre, _rect(pc.out_rows, pc.out_cols, to, dev), to * to)
                a = xrows.index_select(0, src).view(nb.numel(), -1)
            wp = _piece_weight(wk, pc)
            pieces.append((pc, src, dst, None if whole else a, wp))  # whole: ``a`` is x itself
            if whole:
                y = gemm(a, wp.t()).view(n, to, to, d)
        if y is None:
            y = x.new_zeros(n, to, to, d)
        yrows = y.view(-1, d)
        for pc, src, dst, a, wp in pieces:
            if dst is not None:
                yrows.index_add_(0, dst, gemm(a, wp.t()).view(-1, d))
        if bias is not None:
            y += bias
        # every tensor through save_for_backward (x and the weight themselves, so their version
        # counters are checked); ``ctx`` keeps plain values only
        ctx.save_for_backward(x, weight, *(v for _, *tensors in pieces for v in tensors))
        ctx.geometry = [pc for pc, *_ in pieces]
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, weight, *flat = ctx.saved_tensors
        pieces = [(pc, *flat[4 * i:4 * i + 4]) for i, pc in enumerate(ctx.geometry)]
        n, t, _, c = x.shape
        d = weight.shape[0]
        gy = gy.contiguous()
        gyrows = gy.view(-1, d)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = None
        gwk = weight.new_zeros(d, weight.shape[2], weight.shape[3], c) if need_w else None
        order = sorted(pieces, key=lambda p: p[2] is not None)  # the whole-tile piece first
        for pc, src, dst, a, wp in order:
            if dst is None:
                a = x.view(n, -1)
                g = gy.view(n, -1)
            else:
                g = gyrows.index_select(0, dst).view(a.shape[0], -1)
            if need_x:
                ga = gemm(g, wp)
                if src is None:
                    gx = ga.view(n, t, t, c)
                else:
                    if gx is None:
                        gx = gy.new_zeros(n, t, t, c)
                    gx.view(-1, c).index_add_(0, src, ga.view(-1, c))
            if need_w:
                _add_weight_grad(gwk, pc, gemm(g.t(), a), c, d)
        gw = gwk.permute(0, 3, 1, 2).contiguous() if need_w else None
        gb = gy.sum((0, 1, 2)) if (need_b and ctx.has_bias) else None
        return gx, gw, gb, None, None


def _add_weight_grad(gwk: torch.Tensor, pc: _Piece, gwp: torch.Tensor, c: int, d: int) -> None:
    """Add a piece's ``[G*D, rows*cols*C]`` weight gradient into ``gwk [D, k, k, C]``."""
    hr, hc = pc.rows[1] - pc.rows[0], pc.cols[1] - pc.cols[0]
    gwp = gwp.view(len(pc.taps_y), len(pc.taps_x), d, hr, hc, c)
    for iy, ty in enumerate(pc.taps_y):
        for ix, tx in enumerate(pc.taps_x):
            gwk[:, ty:ty + hr, tx:tx + hc] += gwp[iy, ix]


def conv_pieces(x: torch.Tensor, grid: TileGrid, conv, plan) -> torch.Tensor:
    """``conv`` (a :class:`~scott.tokenizer.layers.Conv`) on tiles ``[Nv, t, t, C]`` as GEMM
    pieces (``plan = pieces_plan(t, k, s, p)``) -> ``[Nv, t/s, t/s, out]``."""
    w, b = conv.weight, conv.bias
    if w.dtype != x.dtype:  # autocast: the first conv ran in reduced precision
        w = w.to(x.dtype)
        b = None if b is None else b.to(x.dtype)
    return PiecesConv.apply(x, w, b, grid, plan)
