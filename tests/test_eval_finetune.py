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


# ----------------------------------------------------------------------------- LP-FT: the head first
def _squares(n_per_class: int, classes: int = 3, seed: int = 0):
    """Tiny labelled images: class c has a bright 4 x 4 square in its own corner, plus noise."""
    g = torch.Generator().manual_seed(seed)
    corners = [(0, 0), (0, 12), (12, 0), (12, 12)][:classes]
    items = []
    for c, (top, left) in enumerate(corners):
        for _ in range(n_per_class):
            x = 0.3 * torch.randn(1, 16, 16, generator=g)
            x[:, top:top + 4, left:left + 4] += 2.0
            items.append((x, c))
    return items


def _model(seed: int = 0, classes: int = 3, fc_norm: bool = True):
    from scott.eval.finetune import seeded_init

    with seeded_init(seed):
        return FinetuneClassifier(build_encoder({**TINY, "global_pool": "flat"}), num_classes=classes, fc_norm=fc_norm)


def test_pooled_features_are_what_fc_norm_receives_in_order_and_keep_the_mode():
    from scott.eval.finetune import pooled_features

    model = _model().train()
    data = _squares(5)
    feats, labels = pooled_features(model, data, batch_size=4)
    assert model.training  # the caller's mode is kept
    images = torch.stack([x for x, _ in data])
    model.eval()
    with torch.no_grad():
        expect = model.pool(model.forward_features(images))
    assert feats.shape == (15, 16 * 16) and torch.allclose(feats, expect, atol=1e-6)
    assert labels.tolist() == [y for _, y in data]


def test_fit_head_trains_only_the_head_and_separates_the_classes():
    from scott.eval.finetune import fit_head, pooled_features

    model = _model()
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    feats, labels = pooled_features(model, _squares(10), batch_size=8)
    losses = fit_head(model, feats, labels, epochs=30, lr=3e-3, batch_size=8, seed=0)
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        pred = model.head(model.fc_norm(feats)).argmax(1)
    assert (pred == labels).float().mean() == 1.0  # a random conv stem already separates the corners
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(model.head.weight, head_before)
    again = _model()
    assert fit_head(again, feats, labels, epochs=30, lr=3e-3, batch_size=8, seed=0) == losses  # seeded
    with pytest.raises(ValueError, match="epochs"):
        fit_head(model, feats, labels, epochs=0, lr=1e-3)


def test_finetune_with_a_head_stage_scores_it_as_epoch_zero_and_keeps_it_when_tuning_only_hurts():
    """LP-FT: epoch 0 is the fitted head on the untouched encoder; a fine-tune whose lr wrecks the
    encoder loses to it on validation, and the model returned is that epoch-0 model."""
    from scott.eval.finetune import finetune

    fit, val = _squares(12, seed=1), _squares(4, seed=2)
    model = _model()
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    res = finetune(model, fit, val, None, epochs=2, lr=50.0, warmup_epochs=0, batch_size=12,
                   probe_epochs=30, probe_lr=3e-3, log=lambda s: None)
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2]
    assert res["history"][0]["val_top1"] == 1.0 and res["best_epoch"] == 0
    assert max(h["val_top1"] for h in res["history"][1:]) < 1.0  # lr 50 destroyed what the head had
    assert res["probe_epochs"] == 30 and len(res["probe_losses"]) == 30
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())
    plain = finetune(_model(), fit, val, None, epochs=1, lr=1e-3, batch_size=12, log=lambda s: None)
    assert [h["epoch"] for h in plain["history"]] == [1] and plain["probe_losses"] == []


def test_fold_standardisation_gives_the_same_outputs_on_raw_features():
    from scott.eval.finetune import fold_standardisation

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 3)
    x = 5 + 3 * torch.randn(10, 6)
    mean, std = x.mean(0), x.std(0)
    expect = linear((x - mean) / std)
    fold_standardisation(linear, mean, std)
    assert torch.allclose(linear(x), expect, atol=1e-5)


def test_fit_head_without_fc_norm_fits_standardised_features_and_folds_them_into_the_head():
    """fc_norm=False: the head stage fits the head on per-dimension standardised features (the
    linear probe's view) and leaves a head on raw features that computes the same function; the
    same training on pre-standardised inputs gives the same unfolded head."""
    from scott.eval.finetune import fit_head, pooled_features

    model = _model(fc_norm=False)
    assert isinstance(model.fc_norm, torch.nn.Identity)
    feats, labels = pooled_features(model, _squares(10), batch_size=8)
    feats = feats * torch.linspace(0.01, 100, feats.shape[1])  # badly scaled dimensions
    losses = fit_head(model, feats, labels, epochs=20, lr=3e-3, batch_size=8, seed=0)
    with torch.no_grad():
        assert (model.head(feats).argmax(1) == labels).all()
    reference = _model(fc_norm=False)
    mean, std = feats.mean(0), feats.std(0, unbiased=False)
    standard = (feats - mean) / std
    ref_losses = fit_head(reference, standard, labels, epochs=20, lr=3e-3, batch_size=8, seed=0)
    assert ref_losses == pytest.approx(losses, rel=1e-4)  # standardising again is the identity
    with torch.no_grad():
        assert torch.allclose(model.head(feats), reference.head(standard), atol=1e-3)
