"""Positional embedding, encoder and predictor: shapes, positions, masking semantics."""
import pytest
import torch

from scott.masks import build_mask_generator, masks_for_step
from scott.models import Encoder, Predictor, build_encoder, build_predictor, sincos_2d

CFG = dict(tokenizer="small", backend="dense", img_size=16, patch_size=4, in_chans=3, embed_dim=32,
           depth=2, num_heads=2, mlp_ratio=2.0, hidden_dim=8, predictor_depth=1, predictor_dim=16)


def _encoder(**kw) -> Encoder:
    torch.manual_seed(0)
    return build_encoder({**CFG, **kw}).eval()


def _visible(b=3, nv=6, seed=0):
    mg = build_mask_generator({"kind": "uniform", "ratio": 1 - nv / 16}, (4, 4))
    return masks_for_step(mg, b, seed, 0).visible


# ---------------------------------------------------------------- sincos
def test_sincos_shape_dtype_and_distinct_positions():
    pe = sincos_2d(4, 5, 32)
    assert pe.shape == (20, 32) and pe.dtype == torch.float32
    d = torch.cdist(pe.double(), pe.double())
    assert float(d[~torch.eye(20, dtype=torch.bool)].min()) > 0.1
    assert float(pe.abs().max()) <= 1.0


def test_sincos_values_rows_then_columns():
    pe = sincos_2d(3, 4, 8)
    # row 0 col 0: sin(0)=0, cos(0)=1 in each half
    assert torch.allclose(pe[0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1.0]))
    # patch (row 1, col 2) = index 6: row half uses 1, column half uses 2; omega = [1, 1/100]
    r, c = torch.tensor([1.0, 0.01]), torch.tensor([2.0, 0.02])
    expect = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()])
    assert torch.allclose(pe[6], expect, atol=1e-6)
    # same row => same first half; same column => same second half
    assert torch.equal(pe[4, :4], pe[5, :4]) and torch.equal(pe[1, 4:], pe[5, 4:])


def test_sincos_rejects_bad_dim():
    with pytest.raises(ValueError):
        sincos_2d(2, 2, 30)


# ---------------------------------------------------------------- encoder
def test_encoder_shapes_all_modes():
    enc = _encoder()
    x = torch.randn(3, 3, 16, 16)
    vis = _visible()
    assert enc(x).shape == (3, 16, 32)
    assert enc(x, vis, context_tokens="all").shape == (3, 16, 32)
    out, pos = enc(x, vis, context_tokens="visible", return_positions=True)
    assert out.shape == (3, 6, 32) and pos.shape == (3, 6)
    assert enc.forward_features_pooled(x).shape == (3, 32)
    assert torch.allclose(enc.forward_features_pooled(x), enc(x).mean(1))
    with pytest.raises(ValueError):
        enc(x, vis, context_tokens="some")


def test_visible_positions_are_the_visible_patches_in_order():
    enc = _encoder()
    vis = _visible(b=4, nv=5, seed=3)
    _, pos = enc(torch.randn(4, 3, 16, 16), vis, context_tokens="visible", return_positions=True)
    for b in range(4):
        expect = vis[b].flatten().nonzero().flatten()
        assert torch.equal(pos[b], expect)


def test_visible_mode_ignores_masked_pixels():
    enc = _encoder()
    x = torch.randn(2, 3, 16, 16)
    vis = _visible(b=2, nv=7)
    y = x.clone()
    pix_mask = vis.repeat_interleave(4, 1).repeat_interleave(4, 2)    # [B, 16, 16]
    y[~pix_mask.unsqueeze(1).expand_as(y)] = 5.0 * torch.randn(int((~pix_mask).sum()) * 3)
    a = enc(x, vis, context_tokens="visible")
    b = enc(y, vis, context_tokens="visible")
    assert torch.allclose(a, b, atol=1e-5)
    a_all = enc(x, vis, context_tokens="all")
    b_all = enc(y, vis, context_tokens="all")
    assert torch.allclose(a_all, b_all, atol=1e-5)      # mask tokens replace masked patches
    # ...while a visible pixel does change the output
    z = x.clone()
    r, c = (vis[0].nonzero()[0] * 4).tolist()
    z[0, :, r, c] += 3.0
    assert (enc(z, vis, context_tokens="visible")[0] - a[0]).abs().max() > 1e-3


def test_visible_mode_equals_attention_over_visible_tokens_only():
    """Visible mode = the blocks applied to (tokens + positions) of the visible patches only."""
    enc = _encoder()
    x = torch.randn(2, 3, 16, 16)
    vis = _visible(b=2, nv=6)
    tok = torch.nn.functional.layer_norm(enc.tokenizer(x, vis), (enc.embed_dim,))  # token_norm
    pos = enc.pos_embed[0]
    for b in range(2):
        idx = vis[b].flatten().nonzero().flatten()
        h = (tok[b, idx] + pos[idx])[None]
        for blk in enc.blocks:
            h = blk(h)
        h = enc.norm(h)
        assert torch.allclose(enc(x, vis, context_tokens="visible")[b], h[0], atol=1e-5)


def test_all_mode_uses_mask_token_at_masked_positions():
    enc = _encoder(depth=0)        # no blocks: output = norm(token + pos)
    x = torch.randn(2, 3, 16, 16)
    vis = _visible(b=2, nv=6)
    out = enc(x, vis, context_tokens="all")
    expected_masked = enc.norm(enc.mask_token[0, 0] + enc.pos_embed[0])      # [N, D]
    for b in range(2):
        m = ~vis[b].flatten()
        assert torch.allclose(out[b, m], expected_masked[m], atol=1e-6)


def test_backend_switch_keeps_parameters_and_outputs():
    enc = _encoder()
    x = torch.randn(2, 3, 16, 16)
    ref = enc(x)
    assert enc.backend == "dense"
    enc.backend = "auto"
    assert enc.tokenizer.backend == "auto"
    assert torch.allclose(enc(x), ref, atol=1e-5)
    dense = build_encoder({**CFG, "backend": "auto"}, backend="dense")
    assert dense.backend == "dense"


def test_mask_token_gets_zero_gradient_in_visible_mode():
    enc = _encoder().train()
    out = enc(torch.randn(2, 3, 16, 16), _visible(b=2), context_tokens="visible")
    out.sum().backward()
    assert enc.mask_token.grad is not None and float(enc.mask_token.grad.abs().max()) == 0.0
    assert all(p.grad is not None for p in enc.parameters())


def test_patchify_stack_and_other_image_size():
    enc = _encoder(tokenizer="patchify")
    assert enc(torch.randn(1, 3, 24, 24)).shape == (1, 36, 32)   # positions recomputed for 6x6


# ---------------------------------------------------------------- predictor
def test_predictor_shapes_and_head():
    torch.manual_seed(0)
    pred = build_predictor(CFG, (4, 4))
    assert pred.dim == 16 and pred.out_dim == 32 and len(pred.blocks) == 1
    assert isinstance(pred.head[0], torch.nn.SiLU) and isinstance(pred.head[1], torch.nn.LayerNorm)
    ctx = torch.randn(2, 16, 32)
    assert pred(ctx).shape == (2, 16, 32)
    cpos = torch.tensor([[0, 3, 5], [1, 2, 15]])
    qpos = torch.tensor([[1, 2], [0, 7]])
    assert pred(ctx[:, :3], cpos, qpos).shape == (2, 2, 32)
    assert Predictor((4, 4), 32, 16, depth=1, num_heads=3, out_dim=48)(ctx).shape == (2, 16, 48)


def test_predictor_queries_depend_on_their_position_not_order():
    torch.manual_seed(0)
    pred = build_predictor(CFG, (4, 4)).eval()
    ctx = torch.randn(1, 3, 32)
    cpos = torch.tensor([[0, 3, 5]])
    a = pred(ctx, cpos, torch.tensor([[1, 2, 9]]))
    b = pred(ctx, cpos, torch.tensor([[9, 1, 2]]))
    assert torch.allclose(a[0, [0, 1, 2]], b[0, [1, 2, 0]], atol=1e-5)
    assert (a[0, 0] - a[0, 1]).abs().max() > 1e-3          # different positions, different output


def test_predictor_all_mode_requires_full_context():
    pred = build_predictor(CFG, (4, 4))
    with pytest.raises(ValueError):
        pred(torch.randn(1, 5, 32))


def test_token_norm_balances_tokens_against_positions():
    """With token_norm the encoder ignores the tokenizer's output scale (so sin-cos positions can
    never dwarf the content); without it the same rescaling changes the output."""
    x = torch.randn(2, 3, 16, 16)
    vis = _visible(b=2, nv=6)
    diffs = {}
    for token_norm in (True, False):
        enc = _encoder(token_norm=token_norm)
        with torch.no_grad():
            a = enc(x, vis, context_tokens="visible")
            last_conv = [m for m in enc.tokenizer.layers if m.kind == "conv"][-1]
            last_conv.weight.mul_(10.0)
            b = enc(x, vis, context_tokens="visible")
        diffs[token_norm] = float((a - b).abs().max())
    # Only LayerNorm's eps (1e-5 against token variances ~1e-2) separates the two with the norm.
    assert diffs[True] < 1e-2
    assert diffs[False] > 0.1
