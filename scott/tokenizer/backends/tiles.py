"""Pure-PyTorch sparse backend: computes only the visible patches, exactly.

Each layer's activation is a stack of visible tiles ``[Nv, t, t, C]`` (channels-last; one tile
per visible patch, ``t`` = the patch's footprint at that layer's resolution). A layer reads a
halo around each tile from the VISIBLE neighbour tiles only (zeros for masked or outside
neighbours), which is exactly the dense-masked meaning of
:mod:`scott.tokenizer.backends.dense`: inside a visible tile every site is visible, so no
re-masking is needed.

Per layer:

* first conv: the masked, padded image is cut into visible tiles with their halo and one
  valid ``conv2d`` (oneDNN) runs on that stack;
* a conv whose input tiles are small next to its kernel (e.g. SCOTT's 64 -> 384 7x7 stride-2
  conv on 4x4 tiles, ~90 % of the work): GEMM pieces, one per neighbour direction and tap
  block, computed only for tiles whose neighbour there is visible (true submanifold work:
  masked neighbours' zeros are skipped, not multiplied); float32 GEMMs run on oneDNN's linear
  kernel when a once-per-process probe finds it present and equal to ``torch.mm``, else on
  ``torch.mm`` (:func:`~scott.tokenizer.backends._tiles_ops.gemm_path`);
* any other conv: halo-padded tiles, im2col, one GEMM;
* max-pool / blur: the dense reference's own kernels (the blur's taps from its layer) on
  halo-padded tiles; activations: the layer's own element-wise function.

Halos may reach past the direct neighbours (e.g. a 7x7 conv on 1x1 tiles): every op takes the
neighbour radius it needs. The batch is processed in groups of whole images (neighbours never
cross images) so intermediates stay small enough for the allocator to reuse.
"""
from __future__ import annotations

import torch

from ._tiles_grid import TileGrid, halo_of
from ._tiles_ops import (blur, conv_from_image, conv_im2col, conv_pieces, maxpool_tiles,
                         pad_tiles, pieces_plan, tiles_to_grid)

__all__ = ["available", "run"]

# A conv is computed as GEMM pieces when it needs at most this many of them (small tiles);
# larger tiles (many distinct windows per tile) use one im2col GEMM on halo-padded tiles.
MAX_PIECES = 40

# Visible patches per group of images processed together (see ``run``): the SCOTT stack's
# largest intermediate is ~21 KB per patch in float32, so groups stay under glibc's 32 MB
# mmap threshold.
CHUNK_TILES = 1024


def available() -> tuple[bool, str]:
    return True, ""


def _conv(x: torch.Tensor, grid: TileGrid, conv) -> torch.Tensor:
    t = x.shape[1]
    plan = pieces_plan(t, conv.k, conv.s, conv.p)
    if len(plan) <= MAX_PIECES and conv.k > conv.s:
        return conv_pieces(x, grid, conv, plan)
    before, after = halo_of(conv)
    return conv_im2col(pad_tiles(x, grid, before, after), conv)


def _image_chunks(visible: torch.Tensor, max_tiles: int) -> list[tuple[int, int]]:
    """Split the batch into runs of whole images holding at most ``max_tiles`` visible patches
    (at least one image per run)."""
    counts = visible.flatten(1).sum(1).tolist()
    chunks, start, acc = [], 0, 0
    for i, c in enumerate(counts):
        if acc and acc + c > max_tiles:
            chunks.append((start, i))
            start, acc = i, 0
        acc += c
    chunks.append((start, len(counts)))
    return chunks


def _run_tiles(layers, images: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Final ``[Nv, 1, 1, D]`` tiles of one group of images."""
    b, _, h, w = images.shape
    first = layers[0]
    padded = False
    if first.kind == "conv":
        # conv [-> act] -> maxpool: compute the max-pool's halo with the conv (no gather)
        kinds = [m.kind for m in layers[1:3]]
        padded = kinds[:1] == ["maxpool"] or kinds == ["act", "maxpool"]
        x = conv_from_image(images, grid, first, extend=1 if padded else 0)
        rest = layers[1:]
    else:  # a stack that does not start with a conv: cut the masked image into tiles
        p = h // grid.gh
        x = images.permute(0, 2, 3, 1).reshape(b, grid.gh, p, grid.gw, p, -1)
        x = x.permute(0, 1, 3, 2, 4, 5)[grid.b, grid.gy, grid.gx]
        rest = layers
    for layer in rest:
        kind = layer.kind
        if kind == "act":
            x = layer.dense(x)  # element-wise: the layer's own activation
        elif kind == "conv":
            x = _conv(x, grid, layer)
        elif kind == "maxpool":
            x = maxpool_tiles(x, grid, padded=padded)
            padded = False
        elif kind == "blur":
            x = blur(x, grid, layer)
        else:
            raise ValueError(f"tiles backend: unknown layer kind {kind!r}")
    if x.shape[1] != 1 or x.shape[2] != 1:
        raise ValueError(f"the stack leaves {x.shape[1]}x{x.shape[2]} sites per patch, expected 1")
    return x


def run(layers, images: torch.Tensor, visible: torch.Tensor,
        max_tiles: int = CHUNK_TILES) -> torch.Tensor:
    """``[B, D, gh, gw]`` tokens of the visible patches (exact zeros at masked ones).

    The batch is processed in groups of whole images with at most ``max_tiles`` visible patches
    (neighbours never cross images), which keeps every intermediate small enough to be reused
    by the allocator instead of being mapped and page-faulted afresh each step."""
    if visible is None:
        raise ValueError("the tiles backend needs a visibility mask (use the dense backend for None)")
    layers = list(layers)
    visible = visible.to(images.device)
    if not bool(visible.any()):
        return _all_masked(layers, images, visible)
    outs = []
    for b0, b1 in _image_chunks(visible, max_tiles):
        grid = TileGrid(visible[b0:b1])
        outs.append(_run_tiles(layers, images[b0:b1], grid))
    x = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return tiles_to_grid(x, TileGrid(visible))


def _all_masked(layers, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Zeros for a batch without any visible patch, still connected to the input and every
    parameter so that their gradients are (exact) zeros rather than missing."""
    b, gh, gw = visible.shape
    dim = [m for m in layers if m.kind == "conv"][-1].out_channels
    anchor = images.sum() * 0
    for p in (p for m in layers for p in m.parameters()):
        anchor = anchor + p.sum() * 0
    return images.new_zeros(b, dim, gh, gw) + anchor
