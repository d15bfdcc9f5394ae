"""Internals and pitfalls of the spconv backend (the lead's test_tokenizer.py checks whole stacks).

Everything runs on CPU: the CUDA wheel spconv-cu12x runs forward and backward on CPU tensors
with ConvAlgo.Native. Tests that need spconv are skipped with the backend's own reason when it
is unavailable.
"""
from __future__ import annotations

import pytest
import torch

from scott.tokenizer.backends import dense
from scott.tokenizer.backends import spconv_backend as spb
from scott.tokenizer.layers import Blur, Conv, MaxPool, build_stack
from scott.tokenizer.masks_util import mask_at

AVAILABLE, WHY = spb.available()
needs_spconv = pytest.mark.skipif(not AVAILABLE, reason=f"spconv backend unavailable: {WHY}")

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _visible(b, gh, gw, frac, seed):
    return torch.rand(b, gh, gw, generator=_gen(seed)) < frac


def _fwd_bwd(run, layers, images, visible, seed=1):
    """Forward + backward with a fixed upstream gradient; returns (out, d images, d params)."""
    x = images.clone().requires_grad_()
    layers.zero_grad(set_to_none=True)
    out = run(layers, x, visible)
    g = torch.randn(out.shape, dtype=out.dtype, generator=_gen(seed))  # layout-independent
    (out * g).sum().backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in layers.parameters()]
    return out.detach(), x.grad.clone(), grads


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _assert_matches_dense(layers, images, visible, tol):
    ref = _fwd_bwd(dense.run, layers, images, visible)
    got = _fwd_bwd(spb.run, layers, images, visible)
    assert got[0].shape == ref[0].shape
    assert _rel(got[0], ref[0]) < tol
    assert _rel(got[1], ref[1]) < tol
    for a, b in zip(got[2], ref[2]):
        assert _rel(a, b) < tol
    return got


# --------------------------------------------------------------------------- availability
def test_available_reports_missing_spconv(monkeypatch):
    def broken():
        raise ImportError("No module named 'spconv'")
    monkeypatch.setattr(spb, "_import_spconv", broken)
    ok, why = spb.available()
    assert ok is False
    assert "spconv" in why and "tiles" in why


def test_cpu_only_wheel_is_refused(monkeypatch):
    """The CPU-only 'spconv' wheel races and cannot run backward: unavailable, run() refuses."""
    if not AVAILABLE:
        pytest.skip(WHY)
    sp, conv_cls, algo, _ = spb._import_spconv()
    monkeypatch.setattr(spb, "_import_spconv", lambda: (sp, conv_cls, algo, True))
    ok, why = spb.available()
    assert ok is False and "CPU-only" in why and "tiles" in why
    layers = build_stack("patchify", 1, 4, 4)
    with pytest.raises(RuntimeError, match="tiles"):
        spb.run(layers, torch.zeros(1, 1, 8, 8), torch.ones(1, 2, 2, dtype=torch.bool))


@needs_spconv
def test_algo_choice_on_cpu():
    _, _, conv_algo, _ = spb._import_spconv()
    cpu = torch.device("cpu")
    assert spb._resolve_algo(None, cpu, torch.float32) == conv_algo.Native
    assert spb._resolve_algo("native", cpu, F64) == conv_algo.Native
    with pytest.raises(ValueError, match="implicit GEMM needs CUDA"):
        spb._resolve_algo("implicit_gemm", cpu, torch.float32)
    with pytest.raises(ValueError, match="algo must be one of"):
        spb._resolve_algo("fast", cpu, torch.float32)


# --------------------------------------------------------------------------- sites
def test_sites_are_contiguous_int32_row_major():
    visible = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    sites = spb.sites_at(visible, 4, 4)  # 2x2 pixels per patch
    assert sites.idx.dtype == torch.int32 and sites.idx.is_contiguous()
    assert sites.idx.stride() == (3, 1)  # spconv reads raw memory: (batch, y, x) per row
    expected = mask_at(visible, 4, 4)[:, 0].nonzero().tolist()
    assert sites.idx.tolist() == expected  # row-major (b, y, x)
    assert sites.n == 12
    b, y, x = sites.coords()
    assert torch.equal(sites.rowmap[b, y, x], torch.arange(12))
    assert int((sites.rowmap >= 0).sum()) == 12 and sites.rowmap.min() == -1


def test_packed_fixes_size1_strides():
    w = torch.randn(8, 1, 3, 3).permute(0, 2, 3, 1)  # [out, k, k, in=1]
    assert w.contiguous().stride() == (9, 3, 1, 9)  # .contiguous() leaves the odd stride
    p = spb.packed(w)
    assert p.stride() == (9, 3, 1, 1) and torch.equal(p, w)
    x = torch.randn(5, 4)
    assert spb.packed(x) is x


# --------------------------------------------------------------------------- gathers
def _rows(x, sites):
    """Rows of an NCHW map at the active sites."""
    b, y, xx = sites.coords()
    return x.permute(0, 2, 3, 1)[b, y, xx]


def test_maxpool_gather_matches_dense_including_tie_gradients():
    """Integer-valued features have many ties (and zeros like masked sites); the gradient must go
    to the same window element as max_pool2d's (the first maximum in row-major order)."""
    visible = _visible(2, 3, 4, 0.5, seed=3)
    h, w = 6, 8
    m = mask_at(visible, h, w).to(F64)
    x = torch.randint(-1, 2, (2, 3, h, w), generator=_gen(4)).to(F64) * m
    sites = spb.sites_at(visible, h, w)
    g = torch.randn(2, 3, h, w, dtype=F64, generator=_gen(5))

    xd = x.clone().requires_grad_()
    ref = MaxPool().dense(xd) * m
    (ref * g).sum().backward()

    feats = _rows(x, sites).clone().requires_grad_()
    out = spb._maxpool(feats, sites)
    (out * _rows(g, sites)).sum().backward()

    assert torch.equal(out.detach(), _rows(ref.detach(), sites))
    assert torch.equal(feats.grad, _rows(xd.grad, sites))


@pytest.mark.parametrize("stride", [1, 2])
def test_blur_gather_matches_dense(stride):
    visible = _visible(2, 3, 2, 0.6, seed=7)
    h, w = 12, 8
    m = mask_at(visible, h, w).to(F64)
    x = torch.randn(2, 5, h, w, dtype=F64, generator=_gen(8)) * m
    blur = Blur(stride)
    ref = blur.dense(x)
    ref = ref * mask_at(visible, *ref.shape[2:]).to(F64)
    sites_in = spb.sites_at(visible, h, w)
    sites_out = spb.sites_at(visible, *blur.out_size(h, w))
    out = spb._blur(blur, _rows(x, sites_in), sites_in, sites_out)
    torch.testing.assert_close(out, _rows(ref, sites_out), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------- conv paths
@needs_spconv
@pytest.mark.parametrize("kernel,stride,bias", [(1, 1, True), (1, 2, False), (3, 1, True),
                                                 (5, 2, True), (4, 4, True)])
def test_single_conv_matches_dense(kernel, stride, bias):
    """1x1 (upstream SubMConv 1x1 is wrong: we use a matmul), submanifold, strided + site
    selection, patchify; bias only at kept sites (masked outputs stay exactly zero)."""
    conv = Conv(3, 6, kernel, stride, bias=bias).to(F64)
    if bias:
        torch.nn.init.normal_(conv.bias, generator=_gen(2))
    layers = torch.nn.ModuleList([conv])
    gh, gw = 3, 2
    p = 4
    visible = _visible(2, gh, gw, 0.5, seed=11)
    visible[0, 0, 0] = True
    images = torch.randn(2, 3, gh * p, gw * p, dtype=F64, generator=_gen(12))
    out = _assert_matches_dense(layers, images, visible, tol=1e-12)[0]
    hidden = ~mask_at(visible, *out.shape[2:])[:, 0]
    assert bool((out.permute(0, 2, 3, 1)[hidden] == 0).all())


@needs_spconv
def test_no_visible_patch_gives_zeros_and_zero_grads():
    layers = build_stack("small", 3, 8, 8, hidden_dim=4).to(F64)
    images = torch.randn(2, 3, 16, 16, dtype=F64, generator=_gen(1))
    visible = torch.zeros(2, 2, 2, dtype=torch.bool)
    out, gx, gp = _fwd_bwd(spb.run, layers, images, visible)
    assert out.shape == (2, 8, 2, 2) and bool((out == 0).all())
    assert bool((gx == 0).all()) and all(bool((g == 0).all()) for g in gp)


@needs_spconv
def test_visible_none_means_all_visible():
    layers = build_stack("small", 3, 8, 8, hidden_dim=4).to(F64)
    images = torch.randn(1, 3, 16, 24, dtype=F64, generator=_gen(1))
    full = torch.ones(1, 2, 3, dtype=torch.bool)
    torch.testing.assert_close(spb.run(layers, images, None), spb.run(layers, images, full),
                               rtol=0, atol=0)


# --------------------------------------------------------------------------- CPU exactness
@needs_spconv
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_native_is_exact_and_deterministic(threads):
    """The CUDA wheel's CPU path (Native) must be race-free: float64 forward and gradients equal
    the dense reference to rounding with 1 or 2 torch threads, and repeated runs are
    bit-identical (across thread counts only the GEMM blocking, i.e. the last bit, may change)."""
    old = torch.get_num_threads()
    layers = build_stack("scott", 3, 16, 16, hidden_dim=8).to(F64)
    images = torch.randn(2, 3, 48, 64, dtype=F64, generator=_gen(21))
    visible = _visible(2, 3, 4, 0.5, seed=22)
    try:
        torch.set_num_threads(threads)
        first = _assert_matches_dense(layers, images, visible, tol=1e-12)
        again = _fwd_bwd(spb.run, layers, images, visible)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert all(torch.equal(a, b) for a, b in zip(first[2], again[2]))


@needs_spconv
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_on_cpu_compute_in_float32(dtype):
    layers = build_stack("small", 3, 8, 8, hidden_dim=4)
    images = torch.randn(2, 3, 16, 16, generator=_gen(3)).to(dtype)
    visible = _visible(2, 2, 2, 0.5, seed=4)
    out = spb.run(layers, images, visible)
    assert out.dtype == dtype
    ref = dense.run(layers, images.float(), visible)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-3)  # rounding to 8-11 bits
    hidden = ~mask_at(visible, 2, 2)[:, 0]
    assert bool((out.permute(0, 2, 3, 1)[hidden] == 0).all())  # masked tokens exactly zero
