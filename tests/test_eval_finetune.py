"""Fine-tuning pieces: layer ids, layer-wise lr decay groups, no weight decay on 1-D params."""

import pytest
import torch

from scott.eval.finetune import FinetuneClassifier, FlipView, encoder_layer_id, param_groups
from scott.models import build_encoder

TINY = {"tokenizer": "small", "backend": "dense", "img_size": 16, "patch_size": 4, "in_chans": 1,
        "embed_dim": 16, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0, "hidden_dim": 8}


def test_layer_ids():
    assert encoder_layer_id("encoder.tokenizer.layers.0.weight", 3) == 0
    assert encoder_layer_id("encoder.mask_token", 3) == 0
    assert encoder_layer_id("encoder.blocks.0.attn.qkv.weight", 3) == 1
    assert encoder_layer_id("encoder.blocks.2.mlp.fc1.weight", 3) == 3
    assert encoder_layer_id("encoder.norm.weight", 3) == 4
    assert encoder_layer_id("head.weight", 3) == 4


def test_param_groups_layer_decay_and_no_decay_on_1d():
    torch.manual_seed(0)
    model = FinetuneClassifier(build_encoder(TINY), num_classes=5)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len([p for p in model.parameters() if p.requires_grad])
    for g in groups:
        assert g["lr_scale"] == pytest.approx(0.5 ** (3 + 1 - g["layer"]))
        if g["weight_decay"] > 0:
            assert all(p.ndim > 1 for p in g["params"])
        else:  # 1-D parameters, biases and the encoder's no_weight_decay() (the mask token)
            assert all(p.ndim <= 1 or p is model.encoder.mask_token for p in g["params"])
    head = next(g for g in groups if any(p is model.head.weight for p in g["params"]))
    assert head["lr_scale"] == 1.0 and head["weight_decay"] == 0.05
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.5 ** 4)  # tokenizer
    assert {g["lr_scale"] for g in param_groups(model, 0.05, 1.0)} == {1.0}
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 5)


def test_flip_view_flips_only_horizontally():
    x = torch.arange(6.0).view(1, 2, 3)
    torch.manual_seed(0)
    outs = [FlipView([(x, 1)], p=1.0)[0][0], FlipView([(x, 1)], p=0.0)[0][0]]
    assert torch.equal(outs[0], x.flip(-1)) and torch.equal(outs[1], x)


def test_seeded_init_fixes_the_head_whatever_ran_before_and_keeps_the_global_rng():
    import torch

    from scott.eval.finetune import seeded_init

    heads = []
    for burn in (0, 7):
        torch.rand(burn)  # what the process drew before differs
        before = torch.random.get_rng_state()
        with seeded_init(3):
            heads.append(torch.nn.Linear(16, 4).weight.detach().clone())
        assert torch.equal(torch.random.get_rng_state(), before)
    with seeded_init(4):
        other = torch.nn.Linear(16, 4).weight
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], other)
