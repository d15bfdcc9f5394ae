"""The scott_vit_* timm family (scott.models.timm_family) and the tokenizer as timm's embed_layer."""

from functools import partial

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import get_model_input_config
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2

import scott  # noqa: F401  (registers the family)
from scott.checkpoint import export_encoder
from scott.config import SIZE_PRESETS
from scott.data.transforms import eval_transform_spec, transform_from_spec
from scott.eval.features import load_encoder
from scott.eval.finetune import FinetuneClassifier, param_groups
from scott.models import ScottViT, build_encoder, sincos_2d
from scott.models.encoder import pool_tokens
from scott.models.timm_family import model_args_from_export
from scott.tokenizer import Tokenizer
from train_helpers import one_torch_thread  # noqa: F401 (autouse: 1 thread)

TINY = {"tokenizer": "small", "backend": "dense", "img_size": 16, "patch_size": 4, "in_chans": 1,
        "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "hidden_dim": 8}
TINY_ARGS = {k: v for k, v in TINY.items()}


def _export(tmp_path, cfg, seed=0):
    torch.manual_seed(seed)
    enc = build_encoder(cfg)
    with torch.no_grad():  # non-trivial final norm, so a skipped norm would show
        enc.norm.weight.uniform_(0.5, 1.5)
        enc.norm.bias.normal_(0, 0.1)
    path = tmp_path / "encoder.safetensors"
    export_encoder(path, enc.state_dict(), cfg, eval_transform_spec(cfg))
    return path


def _dense_tokens(tokenizer, x):
    """Hand-built tokens: every layer's dense computation, then row-major [B, N, D]."""
    for layer in tokenizer.layers:
        x = layer.dense(x)
    return x.flatten(2).transpose(1, 2)


def _reference_tokens(model: ScottViT, x):
    """Hand-built encoder: LayerNorm(tokens) + sin-cos positions -> blocks -> final norm."""
    enc = model.encoder
    t = _dense_tokens(enc.tokenizer, x)
    t = F.layer_norm(t, t.shape[-1:]) + sincos_2d(x.shape[-2] // enc.patch_size, x.shape[-1] // enc.patch_size,
                                                  enc.embed_dim)[None]
    for block in enc.blocks:
        t = block(t)
    return enc.norm(t)


# ------------------------------------------------------------------------------------ registry
def test_family_is_registered_with_the_recipe_sizes():
    names = timm.list_models("scott_*")
    assert names == sorted(f"scott_vit_{s}{v}" for s in ("cpu", "tiny", "small", "base") for v in ("", "_patchify"))
    with torch.device("meta"):  # no memory, no init cost
        for name in names:
            m = timm.create_model(name)
            size = name.split("_")[2]
            dim, depth, heads = SIZE_PRESETS[size]
            assert isinstance(m, ScottViT)
            assert (m.embed_dim, len(m.encoder.blocks), m.encoder.blocks[0].attn.num_heads) == (dim, depth, heads)
            stack = "patchify" if name.endswith("_patchify") else ("small" if size == "cpu" else "scott")
            assert m.encoder.tokenizer.stack_name == stack
            cfg = m.pretrained_cfg
            assert m.default_cfg is cfg and cfg["architecture"] == name
            chans, px, patch = (1, 28, 4) if size == "cpu" else (3, 224, 16)
            assert cfg["input_size"] == (chans, px, px) and m.patch_size == patch and m.in_chans == chans
            assert cfg["mean"] == ((0.5,) if chans == 1 else (0.485, 0.456, 0.406))
            assert cfg["crop_pct"] == (1.0 if size == "cpu" else 0.875)
            assert isinstance(m.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
            assert cfg["classifier"] == "head" and m.num_classes == 0  # exports carry no head
    m = timm.create_model("scott_vit_cpu", num_classes=37, **{k: TINY[k] for k in ("embed_dim", "depth", "num_heads")})
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 37) and m.num_classes == 37 and m.num_features == 16


# ------------------------------------------------------------------------------------ exports
def test_export_loads_through_timm_and_equals_the_scott_encoder(tmp_path):
    cfg = {**TINY, "global_pool": "grid2"}
    path = _export(tmp_path, cfg)
    args = model_args_from_export(path)
    assert args["embed_dim"] == 16 and args["global_pool"] == "grid2" and "backend" not in args
    torch.manual_seed(1)
    model = timm.create_model("scott_vit_cpu", pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path)), **args).eval()
    enc = load_encoder(path)
    state = model.state_dict()
    for k, v in enc.state_dict().items():
        assert torch.equal(state[f"encoder.{k}"], v)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        pooled = enc.forward_features_pooled(x)  # [3, 4 * 16]: the export's own global_pool
        assert pooled.shape == (3, 64) and model.num_features == 64
        expected = model.head(model.fc_norm(pooled))
        assert torch.allclose(model(x), expected, atol=1e-6)
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True),
                              model.fc_norm(pooled), atol=1e-6)
        # ... and both equal a computation built by hand from the same weights
        ref = pool_tokens(_reference_tokens(model, x), (4, 4), "grid2")
        assert torch.allclose(pooled, ref, atol=1e-5)
    # timm's data config is the export's evaluation transform, image for image.
    data_cfg = resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (1, 16, 16) and data_cfg["mean"] == (0.5,) and data_cfg["crop_pct"] == 1.0
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (21, 27), dtype=np.uint8), mode="L")
    ours = transform_from_spec(eval_transform_spec(cfg))(img)
    assert torch.allclose(create_transform(**data_cfg)(img), ours, atol=1e-6)
    # num_classes 0 (the registered default): pooled features, strict load (fc_norm kept as built)
    feats = timm.create_model("scott_vit_cpu", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **args)
    with torch.no_grad():
        assert torch.allclose(feats.eval()(x), torch.nn.functional.layer_norm(pooled, (64,)), atol=1e-5)


def test_wrong_or_damaged_exports_are_refused(tmp_path):
    path = _export(tmp_path, TINY)
    with pytest.raises(ValueError, match="embed_dim: export 16, model 192"):
        timm.create_model("scott_vit_cpu", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    # same shapes, different meaning: caught by the metadata, not by the state dict
    with pytest.raises(ValueError, match="num_heads: export 2, model 4"):
        timm.create_model("scott_vit_cpu", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **{**model_args_from_export(path), "num_heads": 4})
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["norm.bias"] = tensors["norm.bias"] + 1e-3
    bad = tmp_path / "damaged.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="damaged"):
        timm.create_model("scott_vit_cpu", pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)),
                          **model_args_from_export(path))


def test_finetune_classifier_is_the_timm_model_and_checkpoints_round_trip(tmp_path):
    path = _export(tmp_path, {**TINY, "global_pool": "flat"})
    assert FinetuneClassifier(load_encoder(path), num_classes=4).global_pool == "flat"  # the encoder's own
    ft = FinetuneClassifier(load_encoder(path), num_classes=4, global_pool="avg")
    assert isinstance(ft, ScottViT) and ft.global_pool == "avg" and ft.num_features == 16
    with torch.no_grad():
        ft.head.bias.normal_()
    ckpt = tmp_path / "finetuned.safetensors"  # a whole-model checkpoint passes the filter unchanged
    save_file({k: v.contiguous() for k, v in ft.state_dict().items()}, str(ckpt))
    again = timm.create_model("scott_vit_cpu", pretrained=True, num_classes=4, pretrained_cfg_overlay=dict(file=str(ckpt)),
                              **{**model_args_from_export(path), "global_pool": "avg"})
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), ft.eval()(x))  # head kept: the checkpoint has 4 classes too
        other = timm.create_model("scott_vit_cpu", pretrained=True, num_classes=6, pretrained_cfg_overlay=dict(
            file=str(ckpt)), **{**model_args_from_export(path), "global_pool": "avg"})
        assert torch.equal(other.encoder.norm.bias, ft.encoder.norm.bias) and other.head.out_features == 6
        assert torch.allclose(ft(x), ft.head(ft.fc_norm(ft.encoder(x).mean(1))), atol=1e-6)


# ------------------------------------------------------------------------------------ timm API
def test_masked_path_is_explicit_in_forward_features():
    torch.manual_seed(0)
    model = ScottViT(num_classes=3, **TINY_ARGS).eval()
    x = torch.randn(2, 1, 16, 16)
    visible = torch.zeros(2, 4, 4, dtype=torch.bool)
    visible[:, :2] = True  # top half visible
    with torch.no_grad():
        full = model.forward_features(x, visible)
        assert torch.equal(full, model.encoder(x, visible, "all"))
        ctx = model.forward_features(x, visible, context_tokens="visible")
        assert ctx.shape == (2, 8, 16)
        x2 = x.clone()
        x2[..., 8:, :] = torch.randn(2, 1, 8, 16)  # change only masked pixels
        assert torch.equal(model.forward_features(x2, visible, context_tokens="visible"), ctx)
        assert not torch.equal(model.forward_features(x2), model.forward_features(x))
        assert torch.allclose(model.forward_head(ctx), model.head(model.fc_norm(ctx.mean(1))), atol=1e-6)


def test_reset_classifier_and_pools():
    torch.manual_seed(0)
    model = ScottViT(num_classes=3, **TINY_ARGS).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), torch.nn.Identity)
        assert torch.allclose(model(x), F.layer_norm(tokens.mean(1), (16,)), atol=1e-5)
        model.reset_classifier(7, global_pool="grid2")
        assert model.num_features == 64 and model.fc_norm.normalized_shape == (64,) and model.head.in_features == 64
        grid = pool_tokens(tokens, (4, 4), "grid2")
        assert torch.allclose(model(x), model.head(model.fc_norm(grid)), atol=1e-5)
        model.reset_classifier(5, global_pool="")
        assert model(x).shape == (2, 16, 5)  # timm's '' = no pooling
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, global_pool="max")


def test_no_weight_decay_and_timm_optimizer_factory():
    torch.manual_seed(0)
    model = ScottViT(num_classes=3, **TINY_ARGS)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() and model.no_weight_decay() <= set(names)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(names["encoder.mask_token"]) in no_decay  # 3-D: only no_weight_decay() keeps it out
    assert id(names["encoder.blocks.0.attn.qkv.weight"]) not in no_decay
    # timm's layer-wise decay (group_matcher) gives every parameter scott's own lr scale
    ours = {id(p): g["lr_scale"] for g in param_groups(model, 0.05, 0.5) for p in g["params"]}
    timms = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    theirs = {id(p): g["lr_scale"] for g in timms.param_groups for p in g["params"]}
    assert theirs.keys() == ours.keys()
    for name, p in names.items():
        assert theirs[id(p)] == pytest.approx(ours[id(p)]), name
    # timm's optimizer fine-tunes it
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8) % 3
    first = None
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < first


def test_timm_training_switches_drop_path_and_grad_checkpointing():
    torch.manual_seed(0)
    model = timm.create_model("scott_vit_cpu", num_classes=3, drop_path_rate=0.2, **{**TINY_ARGS, "depth": 3})
    assert [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in model.encoder.blocks] \
        == pytest.approx([0.0, 0.1, 0.2])
    model.eval()  # no drop path: checkpointed and plain runs must agree, gradients included
    x = torch.randn(2, 1, 16, 16)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), model.encoder.blocks[0].attn.qkv.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_set_input_size_and_dynamic_size():
    torch.manual_seed(0)
    model = ScottViT(num_classes=3, dynamic_img_size=False, **TINY_ARGS).eval()
    x = torch.randn(2, 1, 24, 24)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        model(x)
    model.set_input_size(img_size=24)
    assert model.encoder.grid_size == (6, 6) and model.encoder.num_patches == 36
    assert model.encoder.tokenizer.img_size == (24, 24)
    assert torch.equal(model.encoder.pos_embed, sincos_2d(6, 6, 16)[None])
    assert get_model_input_config(model)["input_size"] == (1, 24, 24)  # the source's pretrained_cfg stays
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 36, 16)
        assert torch.allclose(tokens, _reference_tokens(model, x), atol=1e-5)
        assert torch.allclose(model(x), model.head(model.fc_norm(tokens.mean(1))), atol=1e-6)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        model(torch.randn(1, 1, 16, 16))
    # flat features are tied to the grid; the patch size of a conv stack is fixed
    flat = ScottViT(num_classes=3, global_pool="flat", **TINY_ARGS)
    with pytest.raises(ValueError, match="reset_classifier"):
        flat.set_input_size(img_size=24)
    with pytest.raises(ValueError, match="patchify"):
        model.set_input_size(patch_size=8)
    # the patchify stack resamples its projection, as timm's PatchEmbed does
    pm = ScottViT(num_classes=3, **{**TINY_ARGS, "tokenizer": "patchify", "img_size": 16, "patch_size": 4})
    old = pm.encoder.tokenizer.layers[0].weight.detach().clone()
    pm.set_input_size(patch_size=8)
    assert pm.encoder.grid_size == (2, 2) and pm.patch_size == 8
    assert torch.allclose(pm.encoder.tokenizer.layers[0].weight, resample_patch_embed(old, [8, 8]))
    assert pm(torch.randn(1, 1, 16, 16)).shape == (1, 3)


# ------------------------------------------------------------------------------------ embed_layer route
def _twin_vits(**kw):
    """timm ViT with scott's patchify Tokenizer as embed_layer, and timm's own PatchEmbed ViT with the
    same weights (the patchify stack is a linear patch embedding: the two must agree)."""
    torch.manual_seed(0)
    common = dict(img_size=32, patch_size=4, in_chans=3, num_classes=5, embed_dim=24, depth=1, num_heads=2, **kw)
    ours = VisionTransformer(embed_layer=partial(Tokenizer, stack="patchify"), **common).eval()
    ref = VisionTransformer(**common).eval()
    state = {k.replace("patch_embed.layers.0", "patch_embed.proj"): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(state)
    return ours, ref


def test_embed_layer_route_equals_timms_patch_embed():
    ours, ref = _twin_vits()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)
        for vit in (ours, ref):
            vit.set_input_size(img_size=48)
        assert ours.patch_embed.grid_size == (12, 12) and ours.pos_embed.shape == (1, 145, 24)
        x48 = torch.randn(2, 3, 48, 48)
        assert torch.allclose(ours(x48), ref(x48), atol=1e-5)
        for vit in (ours, ref):
            vit.set_input_size(patch_size=8)
        assert ours.patch_embed.grid_size == (6, 6) and ours.patch_embed.layers[0].weight.shape[-1] == 8
        assert torch.allclose(ours(x48), ref(x48), atol=1e-4)
    dyn, dyn_ref = _twin_vits(dynamic_img_size=True)
    assert dyn.patch_embed.output_fmt == "NHWC"
    with torch.no_grad():
        x40 = torch.randn(2, 3, 40, 24)
        assert torch.allclose(dyn(x40), dyn_ref(x40), atol=1e-5)


def test_embed_layer_route_dynamic_size_equals_a_hand_built_reference():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=1,
                            num_heads=2, dynamic_img_size=True,
                            embed_layer=partial(Tokenizer, stack="small", hidden_dim=8)).eval()
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        tokens = _dense_tokens(vit.patch_embed, x)  # [2, 12 * 8, 32], row-major
        pos = resample_abs_pos_embed(vit.pos_embed, new_size=(12, 8), old_size=(8, 8), num_prefix_tokens=1)
        h = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], 1) + pos
        for block in vit.blocks:
            h = block(h)
        expected = vit.head(vit.norm(h)[:, 0])
        assert torch.allclose(vit(x), expected, atol=1e-5)
    # a strict tokenizer refuses other sizes, like timm's PatchEmbed
    strict = Tokenizer(32, 4, stack="small", hidden_dim=8, img_size=32, strict_img_size=True)
    with pytest.raises(ValueError, match="strict_img_size"):
        strict(x)
