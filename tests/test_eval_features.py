"""Encoder loading (safetensors only, clear errors) and frozen feature extraction."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

from scott.checkpoint import export_encoder
from scott.data.transforms import eval_transform_spec
from scott.eval.features import (
    PixelEncoder,
    cached_features,
    extract_features,
    feature_cache_key,
    load_encoder,
    resolve_which,
)
from scott.models import build_encoder

TINY = {"tokenizer": "small", "backend": "dense", "img_size": 32, "patch_size": 8, "in_chans": 3,
        "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "hidden_dim": 8}


class GreyDigits(torch.utils.data.Dataset):
    """Tiny (PIL 28x28 grey, label) dataset with distinct images."""

    def __init__(self, n=6):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L") for _ in range(n)]
        self.labels = [i % 3 for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


@pytest.fixture()
def run_dir(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder(TINY)
    export_encoder(tmp_path / "encoder.safetensors", enc.state_dict(), TINY, eval_transform_spec(TINY))
    return tmp_path, enc


def test_load_encoder_roundtrip_eval_mode_and_spec(run_dir):
    path, original = run_dir
    enc = load_encoder(path)
    assert not enc.training
    assert enc.eval_transform_spec == eval_transform_spec(TINY)
    x = torch.randn(2, 3, 32, 32)
    original.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), original(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        load_encoder(path, which="context")


def test_resolve_which_follows_the_run_recipe_and_the_file_record(tmp_path):
    from pathlib import Path

    from scott.config import format_recipe, load_recipe

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    encoders = {"target": build_encoder(TINY), "context": build_encoder(TINY)}
    for which, name in (("target", "encoder"), ("context", "context_encoder")):
        export_encoder(run / f"{name}.safetensors", encoders[which].state_dict(), TINY, eval_transform_spec(TINY),
                       extra={"which": which})
    assert resolve_which(run) == "target"  # no recipe.yaml: the EMA target, as before the key
    assert resolve_which(run, "context") == "context"
    for exported in ("context", "target"):
        recipe = load_recipe(root / "recipes" / "demo.yaml", [f"train.export_encoder={exported}"], check_data=False)
        (run / "recipe.yaml").write_text(format_recipe(recipe), encoding="utf-8")
        assert resolve_which(run) == exported
        assert resolve_which(run, "target") == "target" and resolve_which(run, "context") == "context"
        loaded = load_encoder(run)  # the default load is the exported encoder, weights and all
        assert loaded.source_path.endswith("context_encoder.safetensors" if exported == "context"
                                           else "/encoder.safetensors")
        torch.testing.assert_close(loaded.state_dict(), encoders[exported].state_dict(), rtol=0, atol=0)
    # a file is the encoder it records being, whatever ``which`` says; unrecorded: ``which`` or target
    assert resolve_which(run / "context_encoder.safetensors", "target") == "context"
    assert resolve_which(run / "encoder.safetensors", "context") == "target"
    bare = tmp_path / "bare.safetensors"
    export_encoder(bare, encoders["target"].state_dict(), TINY, eval_transform_spec(TINY))
    assert resolve_which(bare) == "target" and resolve_which(bare, "context") == "context"
    with pytest.raises(ValueError, match="which must be one of"):
        resolve_which(run, "ema")


def test_grey_28px_digits_on_rgb_encoder(run_dir):
    path, _ = run_dir
    enc = load_encoder(path / "encoder.safetensors")
    data = GreyDigits(5)
    feats, labels = extract_features(enc, data, pool="avg", batch_size=2, progress=False)
    assert feats.shape == (5, 32) and labels.tolist() == [0, 1, 2, 0, 1]
    tokens, _ = extract_features(enc, data, pool="tokens", batch_size=4, progress=False)
    assert tokens.shape == (5, 16, 32)
    torch.testing.assert_close(tokens.mean(1), feats)
    assert feats.std(dim=0).mean() > 0  # different images -> different features
    # tensor images (float in [0, 1], 1 x 28 x 28) are accepted too and give the same features
    as_tensors = [(torch.from_numpy(np.array(im)).float()[None] / 255.0, y) for im, y in data]
    feats_t, _ = extract_features(enc, as_tensors, progress=False)
    torch.testing.assert_close(feats_t, feats, rtol=1e-4, atol=1e-4)


class DropoutEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, images, visible=None, context_tokens="all"):
        return self.drop(self.proj(images.flatten(2).transpose(1, 2).reshape(images.shape[0], -1, 12)))


def test_extraction_uses_eval_mode_and_restores_training_flag():
    torch.manual_seed(0)
    enc = DropoutEncoder().train()
    data = [(torch.randn(3, 2, 2), i) for i in range(4)]
    a, _ = extract_features(enc, data, transform=lambda x: x, progress=False)
    b, _ = extract_features(enc, data, transform=lambda x: x, progress=False)
    assert torch.equal(a, b)
    assert enc.training  # restored
    # in train mode the same module is random: the test above could fail
    with torch.no_grad():
        x = torch.stack([d[0] for d in data])
        assert not torch.equal(enc(x), enc(x))


def test_corrupt_file_gives_value_error(tmp_path):
    bad = tmp_path / "encoder.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable scott encoder"):
        load_encoder(tmp_path)


def test_foreign_safetensors_gives_value_error(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="scott encoder"):
        load_encoder(foreign)


class _Trap:
    """Unpickling this object creates ``path`` (proof that something unpickled it)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_file_is_never_unpickled(tmp_path):
    flag = tmp_path / "unpickled.flag"
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(pickle.dumps({"w": _Trap(flag)}))
    with pytest.raises(ValueError):
        load_encoder(tmp_path)
    assert not flag.exists()
    pickle.loads(path.read_bytes())  # sanity: unpickling really would create the flag file
    assert flag.exists()


def test_mismatched_weights_give_value_error(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder(TINY)
    other = {**TINY, "embed_dim": 64, "num_heads": 4}
    export_encoder(tmp_path / "encoder.safetensors", enc.state_dict(), other, eval_transform_spec(other))
    with pytest.raises(ValueError, match="do not match"):
        load_encoder(tmp_path)


def test_pixel_encoder_and_feature_cache(tmp_path, run_dir):
    path, _ = run_dir
    pix = PixelEncoder(1, eval_transform_spec({"img_size": 28, "in_chans": 1}))
    data = GreyDigits(3)
    calls = []

    def compute():
        calls.append(1)
        return extract_features(pix, data, progress=False)

    key = feature_cache_key(path / "encoder.safetensors", "demo-train", "avg")
    f1, l1 = cached_features(tmp_path / "cache", key, compute)
    f2, l2 = cached_features(tmp_path / "cache", key, compute)
    assert len(calls) == 1 and torch.equal(f1, f2) and torch.equal(l1, l2)
    assert f1.shape == (3, 28 * 28)
    # normalised pixels: (x/255 - 0.5) / 0.5
    expected = (torch.from_numpy(np.array(data.images[0])).float().flatten() / 255.0 - 0.5) / 0.5
    torch.testing.assert_close(f1[0], expected, rtol=1e-5, atol=1e-5)
    assert key != feature_cache_key(path / "encoder.safetensors", "demo-test", "avg")


def test_extract_features_follows_the_encoders_global_pool():
    import torch as _torch

    from scott.eval.features import extract_features as _extract
    from scott.models import build_encoder

    cfg = dict(tokenizer="small", backend="dense", img_size=16, patch_size=4, in_chans=1, embed_dim=8,
               depth=1, num_heads=2, hidden_dim=4)
    _torch.manual_seed(0)
    avg_enc = build_encoder(cfg)
    grid_enc = build_encoder({**cfg, "global_pool": "grid2"})
    grid_enc.load_state_dict(avg_enc.state_dict())
    data = [(_torch.randn(1, 16, 16), i % 2) for i in range(4)]
    spec = lambda x: x  # noqa: E731  tensors in, tensors out
    a, _ = _extract(avg_enc, data, transform=spec, progress=False)
    g, _ = _extract(grid_enc, data, transform=spec, progress=False)
    assert a.shape == (4, 8) and g.shape == (4, 32)
    # grid2 of a 4x4 grid = means of the four 2x2 quadrants; their mean is the avg pooling
    assert _torch.allclose(g.reshape(4, 8, 4).mean(-1), a, atol=1e-6)
    forced, _ = _extract(grid_enc, data, pool="avg", transform=spec, progress=False)
    assert _torch.allclose(forced, a, atol=1e-6)
