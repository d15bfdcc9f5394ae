"""Internals of the ``tiles`` backend: GEMM-pieces plan, hand-written autograd, halo adjoint.

The end-to-end equality with the dense reference lives in ``tests/test_tokenizer.py``; these
tests pin the pieces that are easiest to get subtly wrong.
"""
from __future__ import annotations

import pytest
import torch

from scott.tokenizer.backends._tiles_grid import TileGrid, span
from scott.tokenizer.backends._tiles_ops import (PiecesConv, conv_im2col, gemm, halo_pad, halo_unpad,
                                                 pad_tiles, pieces_plan)
from scott.tokenizer.backends.tiles import _image_chunks
from scott.tokenizer.layers import Conv

GEOMETRIES = [  # (tile, kernel, stride)
    (4, 7, 2),   # SCOTT's second conv
    (1, 3, 1),   # 3x3 on 1x1 tiles
    (2, 3, 1),
    (1, 7, 1),   # halo reaches 3 tiles away
    (2, 7, 1),
    (4, 3, 2),
    (8, 7, 2),
]


@pytest.mark.parametrize("t,k,s", GEOMETRIES)
def test_pieces_plan_covers_every_tap_of_every_output_once(t, k, s):
    p = k // 2
    to = t // s
    seen = {}
    for pc in pieces_plan(t, k, s, p):
        hr, hc = pc.rows[1] - pc.rows[0], pc.cols[1] - pc.cols[0]
        for a, i in enumerate(range(*pc.out_rows)):
            for b, j in enumerate(range(*pc.out_cols)):
                for ry in range(hr):
                    for rx in range(hc):
                        ky, kx = pc.taps_y[a] + ry, pc.taps_x[b] + rx
                        # the tap must read the input pixel the conv reads
                        y_in = pc.dy * t + pc.rows[0] + ry
                        x_in = pc.dx * t + pc.cols[0] + rx
                        assert y_in == s * i - p + ky and x_in == s * j - p + kx
                        seen[(i, j, ky, kx)] = seen.get((i, j, ky, kx), 0) + 1
    expected = {(i, j, ky, kx) for i in range(to) for j in range(to) for ky in range(k) for kx in range(k)}
    # every tap whose input row/column lies in some tile of the image plane is counted once
    assert set(seen) == expected
    assert set(seen.values()) == {1}


def _grid(seed=0, b=3, gh=4, gw=5):
    gen = torch.Generator().manual_seed(seed)
    vis = torch.rand(b, gh, gw, generator=gen) < 0.55
    vis[0, 0, 0] = True
    return TileGrid(vis), gen


@pytest.mark.parametrize("t,k,s", [(4, 7, 2), (1, 3, 1), (2, 7, 1)])
def test_pieces_conv_equals_padded_conv_and_its_gradients(t, k, s):
    grid, gen = _grid()
    conv = Conv(3, 5, k, s, bias=True).double()
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(grid.count, t, t, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    plan = pieces_plan(t, k, s, conv.p)
    y = PiecesConv.apply(x, conv.weight, conv.bias, grid, plan)
    before, after = conv.p, max(0, k - s - conv.p)
    ref = conv_im2col(pad_tiles(x, grid, before, after), conv)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, rtol=0, atol=1e-12)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)


def test_pieces_conv_passes_gradcheck():
    grid, gen = _grid(seed=1, b=2, gh=3, gw=3)
    conv = Conv(2, 3, 3, 1, bias=True).double()
    x = torch.randn(grid.count, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    plan = pieces_plan(2, 3, 1, 1)
    assert torch.autograd.gradcheck(lambda a, w, b: PiecesConv.apply(a, w, b, grid, plan),
                                    (x, conv.weight, conv.bias))


@pytest.mark.parametrize("t,before,after", [(8, 0, 1), (8, 1, 0), (2, 1, 1), (1, 3, 3), (2, 3, 2)])
def test_halo_unpad_is_the_adjoint_of_halo_pad(t, before, after):
    grid, gen = _grid(seed=2)
    x = torch.randn(grid.count, t, t, 4, generator=gen, dtype=torch.float64)
    xp = halo_pad(x, grid, before, after)
    g = torch.randn(xp.shape, generator=gen, dtype=torch.float64)
    lhs = (xp * g).sum()
    rhs = (x * halo_unpad(g, grid, before, after, t)).sum()
    assert abs(float(lhs - rhs)) < 1e-10 * float(lhs.abs().clamp_min(1))


def test_halo_comes_from_visible_neighbours_only():
    vis = torch.tensor([[[True, False], [True, True]]])
    grid = TileGrid(vis)  # tiles: (0,0)=0, (1,0)=1, (1,1)=2
    x = torch.arange(1.0, 4.0).view(3, 1, 1, 1)
    xp = halo_pad(x, grid, 1, 1)[..., 0]
    # tile 0 at (0,0): right neighbour masked (0), below is tile 1 (2), below-right tile 2 (3)
    assert xp[0].tolist() == [[0, 0, 0], [0, 1, 0], [0, 2, 3]]
    # tile 2 at (1,1): above is masked, left is tile 1, above-left is tile 0
    assert xp[2].tolist() == [[1, 0, 0], [2, 3, 0], [0, 0, 0]]


def test_image_chunks_hold_whole_images_under_the_limit():
    vis = torch.zeros(5, 2, 2, dtype=torch.bool)
    for i, c in enumerate([3, 1, 4, 0, 2]):
        vis[i].view(-1)[:c] = True
    chunks = _image_chunks(vis, 4)
    assert chunks == [(0, 2), (2, 4), (4, 5)]
    assert _image_chunks(vis, 2) == [(0, 1), (1, 2), (2, 3), (3, 5)]  # an image over the limit alone


def test_gemm_matches_matmul():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(37, 19, generator=gen)
    b = torch.randn(41, 19, generator=gen).t()  # transposed view
    assert torch.allclose(gemm(a, b), a @ b, rtol=1e-5, atol=1e-5)
    a64, b64 = a.double(), b.double()
    assert torch.equal(gemm(a64, b64), a64 @ b64)
    assert torch.allclose(gemm(a.t(), a), a.t() @ a, rtol=1e-5, atol=1e-5)


def test_span():
    assert span(-3, 4, 4, -1) == (1, 4)
    assert span(-3, 4, 4, 0) == (0, 4)
    assert span(-3, 4, 4, 1) is None


def test_batch_without_any_visible_patch_gives_zeros_and_zero_gradients():
    from scott.tokenizer import Tokenizer

    tok = Tokenizer(embed_dim=8, patch_size=16, stack="scott", hidden_dim=4, backend="tiles").double()
    images = torch.randn(2, 3, 32, 48, dtype=torch.float64, requires_grad=True)
    out = tok(images, torch.zeros(2, 2, 3, dtype=torch.bool))
    out.sum().backward()
    assert out.shape == (2, 6, 8) and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(images.grad, torch.zeros_like(images.grad))
    for p in tok.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p.grad))


def test_groups_of_images_give_the_same_result_as_one_group():
    from scott.tokenizer import Tokenizer
    from scott.tokenizer.backends import tiles

    tok = Tokenizer(embed_dim=8, patch_size=16, stack="scott", hidden_dim=4).double()
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(5, 3, 48, 48, generator=gen, dtype=torch.float64)
    visible = torch.rand(5, 3, 3, generator=gen) < 0.5
    one = tiles.run(tok.layers, images, visible, max_tiles=10_000)
    many = tiles.run(tok.layers, images, visible, max_tiles=2)
    assert torch.allclose(one, many, rtol=0, atol=1e-13)


@pytest.mark.parametrize("k,s", [(7, 2), (3, 1), (4, 4)])
def test_first_conv_extension_equals_the_gathered_halo(k, s):
    from scott.tokenizer.backends._tiles_ops import conv_from_image

    gen = torch.Generator().manual_seed(6)
    vis = torch.rand(3, 3, 4, generator=gen) < 0.5
    vis[0, 0, 0] = True
    grid = TileGrid(vis)
    conv = Conv(3, 5, k, s, bias=True).double()
    torch.nn.init.normal_(conv.bias)
    p = 8
    images = torch.randn(3, 3, 3 * p, 4 * p, generator=gen, dtype=torch.float64)
    plain = conv_from_image(images, grid, conv)
    extended = conv_from_image(images, grid, conv, extend=1)
    assert torch.allclose(extended, pad_tiles(plain, grid, 0, 1), rtol=0, atol=1e-12)


def test_runs_under_cpu_bf16_autocast_close_to_fp32():
    from scott.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer(embed_dim=16, patch_size=16, stack="scott", hidden_dim=8, backend="tiles")
    gen = torch.Generator().manual_seed(8)
    images = torch.randn(2, 3, 48, 48, generator=gen)
    visible = torch.rand(2, 3, 3, generator=gen) < 0.6
    visible[0, 0, 0] = True
    ref = tok(images, visible).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tok(images, visible)
    out.float().sum().backward()
    assert float((out.detach().float() - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tok.parameters())
