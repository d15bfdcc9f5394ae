"""Objectives: loss only on target tokens, target encoder frozen, pixel overfit, param groups."""
import pytest
import torch

from scott.masks import MaskBatch, build_mask_generator, masks_for_step
from scott.objectives import (MIMJEPA, PixelObjective, build_objective, masked_loss, normalise_patches,
                              patchify)

MODEL = dict(tokenizer="small", backend="dense", img_size=16, patch_size=4, in_chans=3, embed_dim=32,
             depth=2, num_heads=2, mlp_ratio=2.0, hidden_dim=8, predictor_depth=1, predictor_dim=16,
             context_tokens="visible")


def _recipe(name="mimjepa", **model):
    return {"model": {**MODEL, **model}, "objective": {"name": name, "loss": "smooth_l1", "norm_pix": True}}


def _objective(name="mimjepa", **model):
    torch.manual_seed(0)
    return build_objective(_recipe(name, **model))


def _masks(kind="blockwise", b=4, step=0):
    gen = build_mask_generator({"kind": kind, "ratio": 0.6, "min_block": 3}, (4, 4))
    return masks_for_step(gen, b, 0, step)


# ---------------------------------------------------------------- the loss itself
@pytest.mark.parametrize("kind", ["smooth_l1", "l2"])
def test_masked_loss_ignores_non_target_tokens(kind):
    torch.manual_seed(0)
    pred = torch.randn(2, 5, 4, requires_grad=True)
    target = torch.randn(2, 5, 4)
    weight = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    loss = masked_loss(pred, target, weight, kind)
    with torch.no_grad():
        perturbed = pred.clone()
        perturbed[~weight] += 100.0 * torch.randn(int((~weight).sum()), 4)
        perturbed[0, 1] = float("inf")
    assert torch.equal(masked_loss(perturbed, target, weight, kind), loss.detach())
    loss.backward()
    assert float(pred.grad[~weight].abs().max()) == 0.0
    assert float(pred.grad[weight].abs().min(dim=-1).values.min()) > 0


def test_masked_loss_values():
    pred = torch.tensor([[[0.5], [3.0], [10.0]]])
    target = torch.zeros(1, 3, 1)
    w = torch.tensor([[True, True, False]])
    # smooth-L1, beta 1: 0.5 * 0.5^2 = 0.125 and 3 - 0.5 = 2.5 -> mean 1.3125
    assert masked_loss(pred, target, w, "smooth_l1").item() == pytest.approx(1.3125)
    assert masked_loss(pred, target, w, "l2").item() == pytest.approx((0.25 + 9.0) / 2)
    with pytest.raises(ValueError):
        masked_loss(pred, target, w, "l1")


def test_patchify_and_normalise():
    img = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    p = patchify(img, 2)
    assert p.shape == (1, 4, 8)
    # patch 1 (row 0, col 1): pixels (0,2),(0,3),(1,2),(1,3), channels interleaved
    assert p[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]
    n = normalise_patches(torch.randn(3, 5, 12) * 4 + 7)
    assert torch.allclose(n.mean(-1), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(n.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-3)


# ---------------------------------------------------------------- MIM-JEPA
@pytest.mark.parametrize("mode", ["visible", "all"])
@pytest.mark.parametrize("kind", ["blockwise", "multiblock"])
def test_loss_depends_only_on_target_predictions(mode, kind):
    obj = _objective(context_tokens=mode)
    x = torch.randn(4, 3, 16, 16)
    masks = _masks(kind)
    pred, qpos, weight, ctx_mean, ctx_tokens, ctx_positions = obj.predict(x, masks)
    assert obj.global_head is None  # no global head without objective.global_weight
    assert ctx_mean.shape == (4, obj.context_encoder.embed_dim)
    # the weight marks exactly the target patches among the predicted positions
    n_pred = pred.shape[1]
    assert n_pred == (16 if mode == "all" else 16 - masks.num_visible)
    assert torch.equal(weight.sum(1), masks.target.flatten(1).sum(1))
    with torch.no_grad():
        target = obj._select(obj.targets(x, x), qpos)
    pred = pred.detach().requires_grad_(True)
    loss = masked_loss(pred, target, weight, "smooth_l1")
    loss.backward()
    assert float(pred.grad[~weight].abs().max()) == 0.0 if (~weight).any() else True
    assert float(pred.grad[weight].abs().sum()) > 0
    perturbed = pred.detach().clone()
    perturbed[~weight] += 50.0
    assert torch.allclose(masked_loss(perturbed, target, weight, "smooth_l1"), loss.detach())
    # end to end: the forward loss equals this masked loss
    full, stats = obj(x, x, masks)
    assert full.item() == pytest.approx(loss.item(), rel=1e-5)
    assert stats["num_visible"] == masks.num_visible


def test_target_changes_outside_targets_do_not_matter_but_inside_do():
    """Perturb the target image: loss changes only when target-token features change. With a
    0-block target encoder each target token depends on its own patch only (tokenizer receptive
    field stays inside the patch for the 'patchify' stack)."""
    obj = _objective(depth=0, tokenizer="patchify")
    x = torch.randn(2, 3, 16, 16)
    masks = _masks(b=2)
    base, _ = obj(x, x, masks)
    pix_target = masks.target.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(x)
    y = x.clone()
    y[~pix_target] += 3.0                      # change only non-target patches of the target view
    same, _ = obj(x, y, masks)
    assert same.item() == pytest.approx(base.item(), abs=1e-6)
    z = x.clone()
    z[pix_target] += 3.0 * torch.randn(int(pix_target.sum()))
    other, _ = obj(x, z, masks)
    assert abs(other.item() - base.item()) > 1e-4


def test_target_encoder_frozen_dense_and_in_sync():
    obj = _objective(backend="auto")
    assert isinstance(obj, MIMJEPA)
    assert obj.target_encoder.backend == "dense" and obj.context_encoder.backend == "auto"
    assert all(not p.requires_grad for p in obj.target_encoder.parameters())
    for (n, a), (_, b) in zip(obj.context_encoder.named_parameters(), obj.target_encoder.named_parameters()):
        assert torch.equal(a, b), n
    obj.train()
    assert obj.context_encoder.training and not obj.target_encoder.training
    loss, _ = obj(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), _masks(b=2))
    loss.backward()
    assert all(p.grad is None for p in obj.target_encoder.parameters())
    assert all(p.grad is not None for p in obj.trainable_parameters())
    assert obj.export_encoder() is obj.target_encoder


def test_update_target_is_ema_of_context():
    obj = _objective()
    with torch.no_grad():
        for p in obj.context_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in obj.target_encoder.parameters()]
    obj.update_target(0.75)
    for t0, t, c in zip(before, obj.target_encoder.parameters(), obj.context_encoder.parameters()):
        assert torch.allclose(t, 0.75 * t0 + 0.25 * c)


def test_target_features_are_layer_normed():
    obj = _objective()
    t = obj.targets(None, torch.randn(2, 3, 16, 16))
    assert t.shape == (2, 16, 32)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(t.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3)


def test_plain_visible_tensor_means_complement_target():
    obj = _objective()
    x = torch.randn(2, 3, 16, 16)
    masks = _masks(b=2)
    a, _ = obj(x, x, masks.visible)
    b, _ = obj(x, x, MaskBatch(masks.visible, ~masks.visible))
    assert a.item() == b.item()


def test_param_groups_no_decay_on_biases_norms_mask_tokens():
    obj = _objective()
    groups = obj.param_groups(0.05)
    decay, no_decay = groups
    assert decay["apply_wd"] and decay["weight_decay"] == 0.05
    assert not no_decay["apply_wd"] and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    assert id(obj.context_encoder.mask_token) in ids and id(obj.predictor.mask_token) in ids
    assert id(obj.context_encoder.norm.weight) in ids and id(obj.context_encoder.blocks[0].attn.qkv.bias) in ids
    assert id(obj.context_encoder.blocks[0].attn.qkv.weight) in {id(p) for p in decay["params"]}
    all_ids = {id(p) for g in groups for p in g["params"]}
    assert all_ids == {id(p) for p in obj.trainable_parameters()}
    assert not all_ids & {id(p) for p in obj.target_encoder.parameters()}


# ---------------------------------------------------------------- pixel objective
@pytest.mark.parametrize("mode", ["visible", "all"])
def test_pixel_objective_overfits_a_fixed_batch(mode):
    obj = _objective("pixel", context_tokens=mode)
    assert isinstance(obj, PixelObjective) and obj.predictor.out_dim == 4 * 4 * 3
    torch.manual_seed(1)
    x = torch.rand(4, 3, 16, 16)
    masks = _masks(b=4)
    opt = torch.optim.AdamW(obj.param_groups(0.0), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = obj(x, x, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # predicting zeros for unit-variance targets gives ~0.46; memorising the batch goes below
    assert losses[0] > 0.4
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < min(losses[:5]), losses


def test_pixel_targets_are_normalised_context_patches():
    obj = _objective("pixel")
    x = torch.rand(2, 3, 16, 16)
    t = obj.targets(x, torch.zeros_like(x))
    assert torch.allclose(t, normalise_patches(patchify(x, 4)))
    obj.norm_pix = False
    assert torch.allclose(obj.targets(x, None), patchify(x, 4))


def test_unknown_objective_and_loss():
    with pytest.raises(ValueError):
        build_objective({"model": MODEL, "objective": {"name": "dino"}})
    with pytest.raises(ValueError):
        build_objective({"model": MODEL, "objective": {"name": "mimjepa", "loss": "l1"}})
