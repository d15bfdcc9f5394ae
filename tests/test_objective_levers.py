"""Method levers of MIM-JEPA: several context masks per target pass, multi-block targets, the
global term, and the leaky tokenizer ablation. Defaults must keep the old meaning exactly."""
import pytest
import torch
import torch.nn.functional as F

from scott.masks import MaskBatch, build_mask_generator, masks_for_step
from scott.objectives import build_objective
from scott.tokenizer import Tokenizer

MODEL = dict(tokenizer="small", backend="dense", img_size=16, patch_size=4, in_chans=1, embed_dim=32,
             depth=3, num_heads=2, mlp_ratio=2.0, hidden_dim=8, predictor_depth=1, predictor_dim=16,
             context_tokens="visible")


def _objective(**objective):
    torch.manual_seed(0)
    return build_objective({"model": dict(MODEL), "objective": {"name": "mimjepa", **objective}})


def _masks(b, seed=0):
    gen = build_mask_generator({"kind": "blockwise", "ratio": 0.5, "min_block": 2}, (4, 4))
    return masks_for_step(gen, b, seed, 0)


def test_defaults_keep_the_state_dict_and_loss():
    torch.manual_seed(0)
    plain = build_objective({"model": dict(MODEL), "objective": {"name": "mimjepa"}})
    explicit = _objective(num_masks=1, target_layers=1, global_weight=0.0)
    assert plain.state_dict().keys() == explicit.state_dict().keys()
    x, m = torch.randn(4, 1, 16, 16), _masks(4)
    assert plain(x, x, m)[0].item() == explicit(x, x, m)[0].item()


def test_several_masks_equal_repeated_images_with_one_target_pass():
    obj = _objective(num_masks=3)
    x = torch.randn(2, 1, 16, 16)
    masks = _masks(6)
    loss, _ = obj(x, x, masks)
    # the same as 6 separate images (each image 3 times) with the target of its own image
    single = _objective(num_masks=1)
    single.load_state_dict(obj.state_dict())
    rep = x.repeat_interleave(3, 0)
    loss_rep, _ = single(rep, rep, masks)
    assert torch.allclose(loss, loss_rep, atol=1e-6)
    calls = []
    obj.target_encoder.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    obj(x, x, masks)
    assert calls == [2]  # one target pass over the 2 images, not 6


def test_mask_count_must_match_num_masks():
    obj = _objective(num_masks=2)
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="num_masks=2 needs 4"):
        obj(x, x, _masks(2))


def test_target_layers_average_the_last_blocks_each_normalised():
    obj = _objective(target_layers=2)
    x = torch.randn(2, 1, 16, 16)
    _, blocks = obj.target_encoder(x, return_blocks=True)
    assert len(blocks) == 3
    manual = (F.layer_norm(blocks[1], (32,)) + F.layer_norm(blocks[2], (32,))) / 2
    manual = F.layer_norm(manual, (32,))
    assert torch.allclose(obj.targets(None, x), manual, atol=1e-5)
    one = _objective(target_layers=1)
    one.load_state_dict(obj.state_dict())
    assert not torch.allclose(one.targets(None, x), manual, atol=1e-3)
    with pytest.raises(ValueError, match="target_layers"):
        _objective(target_layers=4)


def test_global_term_adds_a_head_and_its_loss():
    obj = _objective(global_weight=0.5)
    assert "global_head" in obj.trainable_modules()
    x, m = torch.randn(4, 1, 16, 16), _masks(4)
    with_global, _ = obj(x, x, m)
    obj.global_weight = 0.0
    without, _ = obj(x, x, m)
    obj.global_weight = 0.5
    # the extra term is exactly 0.5 x smooth-L1 between the head's output and the normed mean target
    pooled = obj.global_head(obj.context_encoder(x, m.visible, context_tokens="visible").mean(1))
    target = obj.targets(x, x).mean(1)
    target = F.layer_norm(target, (32,))
    expected = 0.5 * F.smooth_l1_loss(pooled, target)
    assert torch.allclose(with_global - without, expected, atol=1e-5)
    with_global.backward()
    assert obj.global_head.weight.grad is not None and obj.global_head.weight.grad.abs().sum() > 0


def test_leaky_masking_leaks_only_where_a_masked_neighbour_is_in_reach():
    torch.manual_seed(0)
    sparse = Tokenizer(embed_dim=16, patch_size=4, in_chans=1, stack="small", hidden_dim=8, backend="dense")
    leaky = Tokenizer(embed_dim=16, patch_size=4, in_chans=1, stack="small", hidden_dim=8, masking="leaky")
    leaky.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(sparse(x), leaky(x))  # full images: one meaning
    visible = torch.zeros(2, 4, 4, dtype=torch.bool)
    visible[:, :2, :] = True  # top half visible
    a, b = sparse(x, visible), leaky(x, visible)
    assert torch.equal(a[~visible.flatten(1)], b[~visible.flatten(1)])  # masked tokens are 0 in both
    assert (b[~visible.flatten(1)] == 0).all()
    diff = (a - b).abs().sum(-1).reshape(2, 4, 4)
    assert diff[:, 1].min() > 0      # the row next to the masked half differs: the leak
    with pytest.raises(ValueError, match="masking"):
        Tokenizer(embed_dim=16, patch_size=4, in_chans=1, stack="small", masking="dense")


def test_centered_targets_have_no_position_component():
    obj = _objective(center_targets=True)
    x = torch.randn(6, 1, 16, 16)
    t = obj.targets(None, x)
    plain = _objective()
    plain.load_state_dict(obj.state_dict())
    p = plain.targets(None, x)
    share = lambda z: float(z.mean(0).var(0, unbiased=False).sum() / z.var(dim=(0, 1), unbiased=False).sum())  # noqa: E731
    assert share(p) > 0.05           # uncentred targets carry what every image has at a position
    assert share(t) < 0.02           # centred ones (almost) do not: only LayerNorm's rescaling is left
    assert torch.allclose(t.mean(-1), torch.zeros(6, 16), atol=1e-5)


def test_grid_pooling_keeps_layout_that_avg_pooling_loses():
    from scott.models.encoder import pool_tokens

    tokens = torch.zeros(2, 16, 3)
    tokens[0, 0] = 1.0   # image 0: top-left token
    tokens[1, 15] = 1.0  # image 1: bottom-right token
    avg = pool_tokens(tokens, (4, 4), "avg")
    assert torch.equal(avg[0], avg[1])                      # the same mean
    grid = pool_tokens(tokens, (4, 4), "grid2")
    assert grid.shape == (2, 12) and not torch.equal(grid[0], grid[1])
    assert torch.allclose(grid.reshape(2, 3, 4)[0, :, 0], torch.tensor([0.25, 0.25, 0.25]))
    with pytest.raises(ValueError, match="grid"):
        pool_tokens(tokens, (3, 3), "grid2")


def test_extra_view_leaves_the_first_two_views_unchanged():
    from PIL import Image as _Image

    from scott.data.transforms import TwoViewTransform

    img = _Image.fromarray((torch.rand(28, 28) * 255).byte().numpy())
    two = TwoViewTransform(28, 1, crop_scale=(0.3, 1.0))(img, torch.Generator().manual_seed(5))
    three = TwoViewTransform(28, 1, crop_scale=(0.3, 1.0), extra_view=True)(img, torch.Generator().manual_seed(5))
    assert len(two) == 2 and len(three) == 3
    assert torch.equal(two[0], three[0]) and torch.equal(two[1], three[1])
    assert not torch.equal(three[0], three[2])  # its own crop


def test_cross_view_global_target_comes_from_the_other_view():
    obj = _objective(global_weight=1.0, global_view="crop")
    x, m = torch.randn(4, 1, 16, 16), _masks(4)
    other = torch.randn(4, 1, 16, 16)
    same, _ = obj(x, x, m)
    cross, _ = obj(x, x, m, other)
    obj.global_weight = 0.0
    local, _ = obj(x, x, m)
    pooled = obj.global_head(obj.context_encoder(x, m.visible, context_tokens="visible").mean(1))
    target = F.layer_norm(obj.targets(other, other).mean(1), (32,))
    assert torch.allclose(cross - local, F.smooth_l1_loss(pooled, target), atol=1e-5)
    assert not torch.allclose(same, cross)


def test_global_term_needs_the_latent_objective():
    from scott.config import RecipeError, resolve_recipe

    with pytest.raises(RecipeError, match="objective.global_weight"):
        resolve_recipe({"objective": {"name": "pixel", "global_weight": 1.0}}, source="<t>", check_data=False)


def test_instance_normalised_targets_remove_what_all_patches_share():
    obj = _objective(target_norm="instance")
    x = torch.randn(3, 1, 16, 16)
    feats = obj.target_encoder(x).float()
    expected = F.layer_norm(F.instance_norm(feats.transpose(1, 2)).transpose(1, 2), (32,))
    assert torch.allclose(obj.targets(x, x), expected, atol=1e-5)
    # a constant added to every token of an image (per channel) does not change the targets
    shifted = obj._norm_layer(feats + torch.randn(3, 1, 32))
    assert torch.allclose(shifted, obj._norm_layer(feats), atol=1e-4)
    layer = _objective()
    assert torch.allclose(layer.targets(x, x), F.layer_norm(feats, (32,)), atol=1e-5)
