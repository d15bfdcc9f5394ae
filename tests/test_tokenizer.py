"""The tokenizer's one meaning, checked across every backend that can run here.

The dense-masked backend is the definition; every other available backend must equal it on
random masks, forward and gradients w.r.t. the input and every parameter.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scott.tokenizer import Tokenizer, available_backends, gather_visible, scatter_visible

SPARSE_BACKENDS = [name for name in ("tiles", "spconv")]

# (stack, patch, embed_dim, (H, W), extra kwargs); grids include odd and non-square ones.
CASES = {
    "scott": ("scott", 16, 24, (80, 48), {"hidden_dim": 8}),
    "small-p4": ("small", 4, 16, (28, 20), {"hidden_dim": 6}),
    "small-p8": ("small", 8, 16, (40, 24), {"hidden_dim": 6}),
    "patchify": ("patchify", 8, 12, (24, 40), {}),
    # 7x7 conv on 2x2 tiles: the halo reaches past the direct neighbours.
    "custom-wide-halo": ([{"conv": {"out": 5, "kernel": 7}}, "gelu", "maxblurpool",
                          {"conv": {"kernel": 3, "stride": 1, "bias": True}}], 2, 7, (14, 10), {}),
}


def _need(backend: str) -> None:
    ok, why = available_backends()[backend]
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")


def _make(case: str, backend: str, dtype=torch.float64, seed: int = 0) -> Tokenizer:
    stack, patch, dim, _, kw = CASES[case]
    torch.manual_seed(seed)
    tok = Tokenizer(embed_dim=dim, patch_size=patch, in_chans=3, stack=stack, backend=backend, **kw)
    # Non-trivial biases so that masking of the bias is exercised too.
    for p in tok.parameters():
        if p.dim() == 1:
            torch.nn.init.normal_(p)
    return tok.to(dtype)


def _masks(b: int, gh: int, gw: int, gen: torch.Generator) -> torch.Tensor:
    """Random masks with the edge cases: one image empty, one full, one with a single patch."""
    vis = torch.rand(b, gh, gw, generator=gen) < 0.45
    if b >= 3:
        vis[0] = False
        vis[1] = True
        vis[2] = False
        vis[2, gh - 1, 0] = True
    return vis


def _inputs(case: str, b: int, dtype, seed: int = 1):
    _, patch, _, (h, w), _ = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, h, w, generator=gen, dtype=dtype)
    return images, _masks(b, h // patch, w // patch, gen)


def _forward_backward(tok: Tokenizer, images: torch.Tensor, visible: torch.Tensor):
    images = images.clone().requires_grad_(True)
    tok.zero_grad(set_to_none=True)
    out = tok(images, visible)
    gen = torch.Generator().manual_seed(7)
    weights = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in tok.named_parameters()}
    grads["images"] = images.grad.clone()
    return out.detach(), grads


def _assert_close(actual, expected, rtol, what):
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.0e} x scale {scale:.3e}"


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_backend_equals_dense_reference(backend, case, dtype, rtol):
    _need(backend)
    images, visible = _inputs(case, b=4, dtype=dtype)
    ref_tok = _make(case, "dense", dtype)
    tok = _make(case, backend, dtype)
    tok.load_state_dict(ref_tok.state_dict())
    ref_out, ref_grads = _forward_backward(ref_tok, images, visible)
    out, grads = _forward_backward(tok, images, visible)
    assert tok.last_backend == backend
    assert out.shape == ref_out.shape
    _assert_close(out, ref_out, rtol, f"{backend} forward")
    # Masked positions are exactly zero, not merely small.
    masked = ~visible.reshape(visible.shape[0], -1)
    assert torch.equal(out[masked], torch.zeros_like(out[masked]))
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        _assert_close(grads[name], ref_grads[name], rtol, f"{backend} grad {name}")
    # The gradient check is only meaningful if gradients are not all zero.
    assert ref_grads["images"].abs().sum() > 0


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_batch_of_one_and_all_visible(backend):
    _need(backend)
    case = "scott"
    images, _ = _inputs(case, b=1, dtype=torch.float64)
    ref_tok = _make(case, "dense")
    tok = _make(case, backend)
    tok.load_state_dict(ref_tok.state_dict())
    _, patch, _, (h, w), _ = CASES[case]
    for visible in (torch.ones(1, h // patch, w // patch, dtype=torch.bool),
                    torch.rand(1, h // patch, w // patch, generator=torch.Generator().manual_seed(3)) < 0.5):
        ref_out, ref_grads = _forward_backward(ref_tok, images, visible)
        out, grads = _forward_backward(tok, images, visible)
        _assert_close(out, ref_out, 1e-10, "forward")
        for name in ref_grads:
            _assert_close(grads[name], ref_grads[name], 1e-10, f"grad {name}")


@pytest.mark.parametrize("backend", ["dense", *SPARSE_BACKENDS])
@pytest.mark.parametrize("case", ["scott", "small-p4", "custom-wide-halo"])
def test_masked_pixels_never_leak(backend, case):
    _need(backend)
    tok = _make(case, backend, torch.float32)
    images, visible = _inputs(case, b=4, dtype=torch.float32)
    _, patch, _, _, _ = CASES[case]
    from scott.tokenizer import mask_at

    pix_visible = mask_at(visible, images.shape[2], images.shape[3])
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(11)) * 100
    changed = torch.where(pix_visible, images, noise)
    with torch.no_grad():
        a = tok(images, visible)
        b = tok(changed, visible)
    assert not torch.equal(images, changed)
    assert torch.equal(a, b), "a masked pixel changed a token"
    # And the visible tokens do depend on visible pixels.
    with torch.no_grad():
        c = tok(images + pix_visible.to(images.dtype), visible)
    assert not torch.equal(a, c)


def test_dense_all_visible_is_the_plain_conv_stem():
    """With every patch visible the meaning is the ordinary (unmasked) conv stack."""
    tok = _make("scott", "dense")
    images, _ = _inputs("scott", b=2, dtype=torch.float64)
    x = images
    for layer in tok.layers:
        x = layer.dense(x)
    expected = x.flatten(2).transpose(1, 2)
    full = torch.ones(2, images.shape[2] // 16, images.shape[3] // 16, dtype=torch.bool)
    _assert_close(tok(images, full), expected, 1e-12, "all-visible")
    _assert_close(tok(images), expected, 1e-12, "visible=None")


def test_dense_cpu_path_keeps_grey_images_channels_last_and_equal_to_nchw():
    """A 1-channel batch is NCHW and channels-last at once, so the first conv used to return
    NCHW and the CPU max-pool ran 7x slower; every layer's output is now channels-last on CPU,
    with the same numbers as the NCHW path."""
    from scott.tokenizer.backends import dense

    torch.manual_seed(0)
    tok = Tokenizer(embed_dim=16, patch_size=4, in_chans=1, stack="small", hidden_dim=8, backend="dense")
    images = torch.randn(3, 1, 28, 28)
    visible = torch.rand(3, 7, 7) > 0.4
    cl = dense.run(tok.layers, images, visible, channels_last=True)
    nchw = dense.run(tok.layers, images, visible, channels_last=False)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    torch.testing.assert_close(cl, nchw, rtol=1e-5, atol=1e-6)


def test_patchify_visible_token_is_the_linear_map_of_its_patch():
    tok = _make("patchify", "dense")
    images, visible = _inputs("patchify", b=4, dtype=torch.float64)
    out = tok(images, visible)
    conv = tok.layers[0]
    patches = F.unfold(images, 8, stride=8).transpose(1, 2)  # [B, N, C*8*8]
    expected = patches @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias
    expected = expected * visible.reshape(4, -1, 1)
    _assert_close(out, expected, 1e-12, "patchify")


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_checkpoint_moves_between_backends(backend, tmp_path):
    _need(backend)
    from safetensors.torch import load_file, save_file

    src = _make("scott", backend, torch.float32, seed=5)
    images, visible = _inputs("scott", b=4, dtype=torch.float32)
    with torch.no_grad():
        expected = src(images, visible)
    save_file(src.state_dict(), str(tmp_path / "tok.safetensors"))
    dst = Tokenizer(embed_dim=24, patch_size=16, stack="scott", hidden_dim=8, backend="dense")
    dst.load_state_dict(load_file(str(tmp_path / "tok.safetensors")))
    with torch.no_grad():
        got = dst(images, visible)
    _assert_close(got, expected, 1e-5, "moved checkpoint")
    assert set(src.state_dict()) == set(dst.state_dict())


def test_parameters_have_conv2d_layout_whatever_the_backend():
    shapes = {}
    for backend in ["dense", *[b for b in SPARSE_BACKENDS if available_backends()[b][0]]]:
        tok = Tokenizer(embed_dim=32, patch_size=16, stack="scott", backend=backend)
        shapes[backend] = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    ref = shapes.pop("dense")
    assert ref == {"layers.0.weight": (64, 3, 7, 7), "layers.4.weight": (32, 64, 7, 7)}
    for other in shapes.values():
        assert other == ref


def test_auto_picks_by_visible_fraction_and_says_so():
    tok = Tokenizer(embed_dim=16, patch_size=4, stack="small", hidden_dim=4)
    images = torch.randn(2, 3, 16, 16)
    tok(images, torch.ones(2, 4, 4, dtype=torch.bool))
    assert tok.last_backend == "dense"
    assert "auto (last picked: dense)" in repr(tok)
    part = torch.zeros(2, 4, 4, dtype=torch.bool)
    part[:, :2] = True
    tok(images, part)
    assert tok.last_backend == ("tiles" if available_backends()["tiles"][0] else "dense")
    assert f"last picked: {tok.last_backend}" in repr(tok)


def test_gather_and_scatter_visible():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    visible = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool).reshape(2, 2, 3)
    got, pos = gather_visible(tokens, visible)
    assert pos.tolist() == [[0, 2, 5], [1, 2, 3]]
    assert torch.equal(got[0], tokens[0, [0, 2, 5]])
    assert torch.equal(got[1], tokens[1, [1, 2, 3]])
    back = scatter_visible(got, pos, 6)
    assert torch.equal(back, tokens * visible.reshape(2, 6, 1))
    uneven = visible.clone()
    uneven[0, 0, 1] = True
    with pytest.raises(ValueError, match=r"same visible count.*\[4, 3\]"):
        gather_visible(tokens, uneven)


@pytest.mark.parametrize("bad,pattern", [
    (lambda t: t(torch.randn(2, 3, 30, 32)), r"30x32 is not divisible by the patch size 16"),
    (lambda t: t(torch.randn(2, 1, 32, 32)), r"3 channels \[B, 3, H, W\].*\(2, 1, 32, 32\)"),
    (lambda t: t(torch.randn(2, 3, 32, 32), torch.ones(2, 2, 3, dtype=torch.bool)), r"\[2, 2, 2\].*\[2, 2, 3\]"),
    (lambda t: t(torch.randn(2, 3, 32, 32), torch.ones(2, 2, 2)), r"bool.*torch.float32"),
    (lambda t: t(torch.randn(3, 32, 32)), r"\[B, C, H, W\].*\(3, 32, 32\)"),
])
def test_clear_errors(bad, pattern):
    tok = Tokenizer(embed_dim=16, patch_size=16, stack="scott", hidden_dim=4)
    with pytest.raises(ValueError, match=pattern):
        bad(tok)


def test_constructor_errors():
    with pytest.raises(ValueError, match="total stride of 16; got patch_size=8"):
        Tokenizer(embed_dim=16, patch_size=8, stack="scott")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        Tokenizer(embed_dim=16, backend="fast")
    with pytest.raises(ValueError, match="ends with 8 channels; embed_dim is 16"):
        Tokenizer(embed_dim=16, patch_size=1, stack=[{"conv": {"out": 8}}, {"conv": {"out": 8}}])


def test_timm_vit_with_tokenizer_as_embed_layer():
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=1,
                            num_heads=2, embed_layer=partial(Tokenizer, stack="small", hidden_dim=8)).eval()
    assert isinstance(vit.patch_embed, Tokenizer)
    assert vit.patch_embed.num_patches == 64 and vit.patch_embed.grid_size == (8, 8)
    images = torch.randn(2, 3, 32, 32)
    logits = vit(images)
    assert logits.shape == (2, 5)
    logits.square().sum().backward()
    assert vit.patch_embed.layers[0].weight.grad.abs().sum() > 0
    # timm's forward equals a ViT built by hand from the same weights: each stack layer's dense
    # computation, row-major tokens, class token, timm's (random) learned positions, blocks, norm,
    # class-token head. A wrong token order, layer or position would change the logits.
    with torch.no_grad():
        x = images
        for layer in vit.patch_embed.layers:
            x = layer.dense(x)
        tokens = x.flatten(2).transpose(1, 2)                          # [2, 64, 32]
        h = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], dim=1) + vit.pos_embed
        for block in vit.blocks:
            h = block(h)
        expected = vit.head(vit.norm(h)[:, 0])
        assert torch.allclose(vit(images), expected, atol=1e-5)
        assert not torch.allclose(vit(images.flip(-1)), expected, atol=1e-3)
