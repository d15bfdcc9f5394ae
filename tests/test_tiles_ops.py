"""The ``tiles`` backend's sharp edges: GEMM paths, saved tensors, the one halo gather, shared taps.

* both GEMM paths (the private oneDNN linear op behind its probe, and the public ``torch.mm``
  fallback) are forced in turn and must give the dense backend's tokens and gradients;
* the probe rejects a private op that is missing or gives different numbers;
* the hand-written autograd functions keep their tensors through ``save_for_backward``
  (version-counter checks, saved-tensor hooks) and hold no tensor on ``ctx``;
* the halo gather equals an independent dense oracle; the blur's taps are the layer's own.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scott.tokenizer import Tokenizer
from scott.tokenizer.backends import _tiles_ops as ops
from scott.tokenizer.backends import dense, tiles
from scott.tokenizer.backends._tiles_grid import TileGrid
from scott.tokenizer.layers import Blur, Conv
from train_helpers import one_torch_thread  # noqa: F401  (autouse: 1 torch thread)


@pytest.fixture
def fresh_probe():
    """Run the (cached) oneDNN probe afresh inside the test, and restore it afterwards."""
    ops.onednn_gemm_agrees.cache_clear()
    yield
    ops.onednn_gemm_agrees.cache_clear()


def _need_onednn():
    if not ops.onednn_gemm_agrees():
        pytest.skip("oneDNN's linear op is unavailable (or disagrees) here: only torch.mm runs")


# (stack, patch, dim, (H, W), kwargs): both use GEMM pieces (7x7 s2 on 4x4 tiles; 3x3 on 1x1 / 2x2)
STACKS = {
    "scott": ("scott", 16, 24, (80, 48), {"hidden_dim": 8}),
    "small-p8": ("small", 8, 16, (40, 24), {"hidden_dim": 6}),
}


def _tokenizer_and_inputs(case: str):
    stack, patch, dim, (h, w), kw = STACKS[case]
    torch.manual_seed(0)
    tok = Tokenizer(embed_dim=dim, patch_size=patch, in_chans=3, stack=stack, **kw)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, h, w, generator=gen)
    visible = torch.rand(4, h // patch, w // patch, generator=gen) < 0.45
    visible[1] = True
    visible[2] = False
    visible[2, -1, 0] = True
    weights = torch.randn(4, dim, h // patch, w // patch, generator=gen)
    return tok, images, visible, weights


def _fwd_bwd(run, tok, images, visible, weights):
    images = images.clone().requires_grad_(True)
    tok.zero_grad(set_to_none=True)
    out = run(tok.layers, images, visible)
    (out * weights).sum().backward()
    return [out.detach(), images.grad] + [p.grad.clone() for p in tok.parameters()]


def _assert_close(got, want, rtol=1e-5):
    for a, b in zip(got, want, strict=True):
        scale = b.abs().max().clamp_min(1.0)
        assert float((a - b).abs().max()) <= rtol * float(scale)


# --------------------------------------------------------------------------- GEMM paths

@pytest.mark.parametrize("case", list(STACKS))
@pytest.mark.parametrize("path", ops.GEMM_PATHS)
def test_each_gemm_path_gives_the_dense_tokens_and_gradients(case, path, monkeypatch):
    if path == "onednn":
        _need_onednn()
    calls = []
    real = ops._onednn_linear
    monkeypatch.setattr(ops, "_onednn_linear", lambda a, w: calls.append(1) or real(a, w))
    tok, images, visible, weights = _tokenizer_and_inputs(case)
    want = _fwd_bwd(dense.run, tok, images, visible, weights)
    with ops.forced_gemm_path(path):
        assert ops.gemm_path() == path
        got = _fwd_bwd(tiles.run, tok, images, visible, weights)
    assert bool(calls) == (path == "onednn")  # the forced path is the one that ran
    _assert_close(got, want)


def test_the_two_gemm_paths_agree_on_every_layout():
    _need_onednn()
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(37, 190, generator=gen)
    b = torch.randn(41, 190, generator=gen).t()  # transposed view
    c = torch.randn(190, 23, generator=gen)[::1, ::2]  # neither dense nor transposed-dense
    for x, y in ((a, b), (a, c), (b.t(), a.t()), (a.t(), a)):
        with ops.forced_gemm_path("mm"):
            ref = ops.gemm(x, y)
        with ops.forced_gemm_path("onednn"):
            got = ops.gemm(x, y)
        assert torch.equal(ref, torch.mm(x, y))
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_probe_rejects_a_private_op_that_gives_other_numbers(fresh_probe, monkeypatch):
    # e.g. a torch upgrade that makes the op compute in bf16, or return a slightly wrong result
    monkeypatch.setattr(ops, "_onednn_linear",
                        lambda a, w: torch.mm(a.bfloat16(), w.t().bfloat16()).float())
    assert ops.onednn_gemm_agrees() is False
    assert ops.gemm_path() == "mm"
    with pytest.raises(RuntimeError, match="disagrees"):
        with ops.forced_gemm_path("onednn"):
            pass
    ops.onednn_gemm_agrees.cache_clear()
    monkeypatch.setattr(ops, "_onednn_linear", lambda a, w: torch.mm(a, w.t()) + 1e-3)
    assert ops.onednn_gemm_agrees() is False


def test_probe_rejects_a_missing_private_op(fresh_probe, monkeypatch):
    def missing(a, w):
        return torch.ops.mkldnn._no_such_linear_op(a, w)

    monkeypatch.setattr(ops, "_onednn_linear", missing)
    assert ops.onednn_gemm_agrees() is False
    assert ops.gemm_path() == "mm"
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    assert torch.equal(ops.gemm(a, b), torch.mm(a, b))  # and the fallback still computes


def test_probe_accepts_the_real_op_when_it_agrees(fresh_probe):
    try:
        exists = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
    except Exception:  # noqa: BLE001
        exists = False
    if not exists:
        pytest.skip("no oneDNN linear op in this torch build")
    assert ops.onednn_gemm_agrees() is True


def test_forced_path_is_validated_and_restored():
    before = ops.gemm_path()
    with pytest.raises(ValueError, match="GEMM path"):
        with ops.forced_gemm_path("blas"):
            pass
    with ops.forced_gemm_path("mm"):
        assert ops.gemm_path() == "mm"
    assert ops.gemm_path() == before


# --------------------------------------------------------------------------- saved tensors

def _grid(seed=0, b=3, gh=4, gw=5):
    gen = torch.Generator().manual_seed(seed)
    vis = torch.rand(b, gh, gw, generator=gen) < 0.55
    vis[0, 0, 0] = True
    return TileGrid(vis), gen


def _pieces_inputs(t=4, k=7, s=2):
    grid, gen = _grid()
    conv = Conv(3, 5, k, s, bias=True).double()
    leaf = torch.randn(grid.count, t, t, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    return grid, conv, leaf, ops.pieces_plan(t, k, s, conv.p)


def test_pieces_conv_detects_an_input_modified_in_place_after_forward():
    grid, conv, leaf, plan = _pieces_inputs()
    x = leaf.clone()
    y = ops.PiecesConv.apply(x, conv.weight, conv.bias, grid, plan)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_pieces_conv_detects_a_weight_updated_between_forward_and_backward():
    grid, conv, leaf, plan = _pieces_inputs()
    y = ops.PiecesConv.apply(leaf, conv.weight, conv.bias, grid, plan)
    with torch.no_grad():
        conv.weight.add_(1.0)  # e.g. an optimizer step before backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_saved_tensor_hooks_see_every_saved_tensor():
    """Pack every saved tensor into a detached copy (as offloading would) and zero the original
    storage afterwards: gradients are unchanged only if backward reads what the hooks return."""
    grid, conv, leaf, plan = _pieces_inputs()
    gy = torch.randn(grid.count, 2, 2, 5, dtype=torch.float64)

    def run(x):
        y = ops.PiecesConv.apply(ops.pad_tiles(x, grid, 1, 1)[:, 1:-1, 1:-1], conv.weight,
                                 conv.bias, grid, plan)
        return torch.autograd.grad(y, (leaf, conv.weight, conv.bias), gy)

    want = run(leaf)
    packed = []

    def pack(t):
        packed.append(t)
        return t.detach().clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.PiecesConv.apply(ops.pad_tiles(leaf, grid, 1, 1)[:, 1:-1, 1:-1], conv.weight,
                                 conv.bias, grid, plan)
    assert any(t is conv.weight for t in packed)
    pieces_saved = len(y.grad_fn.saved_tensors)
    assert pieces_saved > 2 + 4  # x, weight + (src, dst, a, weight piece) per piece
    with torch.no_grad():
        for t in packed:
            if t is not conv.weight and t.is_floating_point():
                t.zero_()  # the originals are no longer what backward reads
    got = torch.autograd.grad(y, (leaf, conv.weight, conv.bias), gy)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def _tensors_in(value, depth=0):
    if isinstance(value, torch.Tensor):
        return 1
    if depth < 3 and isinstance(value, (list, tuple, dict)):
        items = value.values() if isinstance(value, dict) else value
        return sum(_tensors_in(v, depth + 1) for v in items)
    if depth < 3 and hasattr(value, "__slots__"):
        return sum(_tensors_in(getattr(value, s, None), depth + 1) for s in value.__slots__)
    return 0


def test_no_autograd_function_of_the_tiles_backend_keeps_a_tensor_on_ctx():
    tok, images, visible, _ = _tokenizer_and_inputs("scott")
    out = tiles.run(tok.layers, images.requires_grad_(True), visible)
    seen, stack, custom = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            custom.append(node)
        stack.extend(n for n, _ in node.next_functions)
    names = {type(n).__name__ for n in custom}
    assert {"PiecesConvBackward", "HaloPadBackward"} <= names
    for node in custom:
        assert node.saved_tensors, type(node).__name__
        held = {k: _tensors_in(v) for k, v in vars(node).items()}
        assert not any(held.values()), f"{type(node).__name__} keeps tensors on ctx: {held}"


def test_pieces_conv_is_once_differentiable():
    grid, conv, leaf, plan = _pieces_inputs()
    y = ops.PiecesConv.apply(leaf, conv.weight, conv.bias, grid, plan)
    (g,) = torch.autograd.grad(y.sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), conv.weight)


# --------------------------------------------------------------------------- halo gather

def _oracle_pad(x, grid, before, after):
    """Tiles scattered into a dense zero canvas, zero-padded, windows cut back out."""
    n, t, _, c = x.shape
    canvas = x.new_zeros(grid.batch, grid.gh * t, grid.gw * t, c)
    for i in range(n):
        b, gy, gx = int(grid.b[i]), int(grid.gy[i]), int(grid.gx[i])
        canvas[b, gy * t:(gy + 1) * t, gx * t:(gx + 1) * t] = x[i]
    canvas = F.pad(canvas, (0, 0, before, after, before, after))
    size = t + before + after
    return torch.stack([canvas[int(grid.b[i]), int(grid.gy[i]) * t:int(grid.gy[i]) * t + size,
                               int(grid.gx[i]) * t:int(grid.gx[i]) * t + size] for i in range(n)])


@pytest.mark.parametrize("t,before,after", [(8, 0, 1), (8, 1, 0), (2, 1, 1), (1, 3, 3), (2, 3, 2),
                                            (4, 3, 2)])
def test_the_halo_gather_equals_a_dense_oracle_and_its_gradient(t, before, after):
    grid, gen = _grid(seed=2)
    x = torch.randn(grid.count, t, t, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    got = ops.pad_tiles(x, grid, before, after)
    want = _oracle_pad(x, grid, before, after)
    assert torch.equal(got, want)
    assert torch.equal(ops.halo_pad(x.detach(), grid, before, after), want)
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (ga,) = torch.autograd.grad(got, x, g)
    (gb,) = torch.autograd.grad(want, x, g)
    assert torch.allclose(ga, gb, rtol=0, atol=1e-12)


def test_the_halo_gather_passes_gradcheck_and_reuses_its_plan():
    grid, gen = _grid(seed=4, b=2, gh=3, gw=3)
    x = torch.randn(grid.count, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ops.pad_tiles(a, grid, 1, 2), (x,))
    assert ops.halo_plan(grid, 2, 1, 2) is ops.halo_plan(grid, 2, 1, 2)


# --------------------------------------------------------------------------- one definition

def test_blur_taps_and_activations_are_read_from_the_layers():
    tok, images, visible, weights = _tokenizer_and_inputs("scott")
    for layer in tok.layers:
        if isinstance(layer, Blur):  # any other filter: the tiles backend must follow it
            layer.taps.copy_(torch.tensor([0.1, 0.7, 0.2]))
    want = _fwd_bwd(dense.run, tok, images, visible, weights)
    got = _fwd_bwd(tiles.run, tok, images, visible, weights)
    _assert_close(got, want)
    # and a layer's own kernel is what the dense form applies
    blur = Blur(1)
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(blur.dense(x), F.conv2d(x, blur.kernel(2, x.dtype), None, 1, 1, 1, 2))
