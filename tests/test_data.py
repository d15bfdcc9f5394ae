"""Data: IDX reader, datasets, bad images, channel conversion, transforms, splits."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from scott.config import default_recipe
from scott.data.datasets import (
    BadImageError,
    DatasetError,
    build_dataset,
    build_pretrain_dataset,
    check_dataset_size,
    pretrain_split,
    split_train_val,
)
from scott.data.idx import IdxError, read_idx, write_idx
from scott.data.roots import default_root, find_idx_file
from scott.data.transforms import (
    PretrainDataset,
    TwoViewTransform,
    build_pretrain_transform,
    eval_transform,
    eval_transform_spec,
    transform_from_spec,
    translate_replicate,
)


def data_cfg(**kw):
    cfg = default_recipe()["data"]
    cfg.update(kw)
    return cfg


# --- IDX -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    labels = rng.integers(-1000, 1000, size=(7,), dtype=np.int32)
    write_idx(tmp_path / name, images)
    write_idx(tmp_path / f"l{name}", labels)
    got_images, got_labels = read_idx(tmp_path / name), read_idx(tmp_path / f"l{name}")
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 5, 3)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    raw = (tmp_path / name).read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")


def test_idx_header_layout(tmp_path):
    write_idx(tmp_path / "a", np.arange(6, dtype=np.uint8).reshape(2, 3))
    raw = (tmp_path / "a").read_bytes()
    assert raw == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 1, 2, 3, 4, 5])


def test_idx_truncated_file_names_path(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    write_idx(path, np.zeros((4, 2, 2), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(IdxError, match=str(path) + ".*13 bytes.*16"):
        read_idx(path)


def test_idx_bad_magic_and_bad_gzip(tmp_path):
    (tmp_path / "m").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(IdxError, match="magic"):
        read_idx(tmp_path / "m")
    (tmp_path / "g.gz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(IdxError, match="g.gz"):
        read_idx(tmp_path / "g.gz")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")


# --- demo and Fashion-MNIST --------------------------------------------------------------------


def test_demo_dataset_counts_and_classes():
    train, test = build_dataset(data_cfg(), "train"), build_dataset(data_cfg(), "test")
    assert (len(train), len(test)) == (5000, 1000)
    assert train.num_classes == test.num_classes == 10
    np.testing.assert_array_equal(np.bincount(train.labels), [500] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [100] * 10)
    img, label = train[0]
    assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
    assert label == int(train.labels[0]) and 0 <= label < 10
    assert np.asarray(img).std() > 10  # real pictures, not blank


def test_demo_is_subset_of_debian_fashion_mnist():
    root = default_root("fashion_mnist")
    if find_idx_file(root, "t10k-images-idx3-ubyte") is None:
        pytest.skip("Debian dataset-fashion-mnist not installed")
    full = read_idx(find_idx_file(root, "t10k-images-idx3-ubyte"))
    demo = build_dataset(data_cfg(), "test")
    first = np.asarray(demo[0][0])
    assert any(np.array_equal(first, full[i]) for i in range(len(full)))


def test_demo_has_no_val_split():
    with pytest.raises(DatasetError, match="split_train_val"):
        build_dataset(data_cfg(), "val")


def test_demo_in_chans_3_gives_rgb_with_equal_channels():
    img, _ = build_dataset(data_cfg(), "train", in_chans=3)[3]
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (28, 28, 3)
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])


def test_fashion_mnist_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        build_dataset(data_cfg(name="fashion_mnist", root=str(tmp_path)), "train")


# --- image folders, bad images, channels -----------------------------------------------------


def make_folder(root, counts, mode="RGB", size=(12, 10)):
    rng = np.random.default_rng(1)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / cls / f"{i}.png")


@pytest.fixture
def folder_with_corrupt(tmp_path):
    make_folder(tmp_path / "train", {"cat": 3, "dog": 2})
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return tmp_path, bad


def test_imagefolder_loads_classes(tmp_path):
    make_folder(tmp_path / "train", {"b": 2, "a": 3})
    ds = build_dataset(data_cfg(name="imagefolder", root=str(tmp_path)), "train")
    assert ds.classes == ["a", "b"] and list(ds.labels) == [0, 0, 0, 1, 1]
    img, label = ds[4]
    assert img.mode == "RGB" and img.size == (12, 10) and label == 1


def test_corrupt_image_error_names_path(folder_with_corrupt):
    root, bad = folder_with_corrupt
    ds = build_dataset(data_cfg(name="imagefolder", root=str(root)), "train")
    assert len(ds) == 6
    index = [str(p) for p in ds.paths].index(str(bad))
    with pytest.raises(BadImageError, match="broken.png"):
        ds[index]
    assert ds[0][0].size == (12, 10)  # good images still load


def test_corrupt_image_skip_logs_path_and_count(folder_with_corrupt, caplog):
    root, bad = folder_with_corrupt
    with caplog.at_level(logging.WARNING, logger="scott.data.datasets"):
        ds = build_dataset(data_cfg(name="imagefolder", root=str(root), on_bad_image="skip"), "train")
    assert len(ds) == 5 and list(ds.labels) == [0, 0, 0, 1, 1]
    assert str(bad) in caplog.text
    assert "skipped 1 of 6 images" in caplog.text
    assert all(ds[i][0].size == (12, 10) for i in range(len(ds)))


def test_truncated_jpeg_caught_by_the_scan_and_at_read_time(tmp_path, caplog):
    (tmp_path / "train" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "train" / "a" / f"{i}.jpg")
    victim = tmp_path / "train" / "a" / "1.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # the header (and PIL's verify) pass, decoding fails
    cfg = data_cfg(name="imagefolder", root=str(tmp_path), on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="scott.data.datasets"):
        ds = build_dataset(cfg, "train")
    assert len(ds) == 3 and victim not in ds.paths  # the scan decodes pixels
    assert "1.jpg" in caplog.text and "truncated" in caplog.text and "skipped 1 of 4" in caplog.text
    # a file that breaks after the scan is replaced by the next readable one at read time
    late = tmp_path / "train" / "a" / "2.jpg"
    late.write_bytes(late.read_bytes()[:200])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scott.data.datasets"):
        replacement = ds[ds.paths.index(late)][0]
    assert "2.jpg" in caplog.text
    np.testing.assert_array_equal(np.asarray(replacement), np.asarray(ds[ds.paths.index(late) + 1][0]))
    with pytest.raises(BadImageError, match="1.jpg"):
        build_dataset(data_cfg(name="imagefolder", root=str(tmp_path)), "train")[1]


def test_empty_class_folder_is_an_error(tmp_path):
    make_folder(tmp_path / "train", {"a": 2})
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty.*no images"):
        build_dataset(data_cfg(name="imagefolder", root=str(tmp_path)), "train")


def test_missing_split_folder(tmp_path):
    make_folder(tmp_path / "train", {"a": 2})
    with pytest.raises(DatasetError, match="test"):
        build_dataset(data_cfg(name="imagefolder", root=str(tmp_path)), "test")


def test_grey_to_rgb_and_rgb_to_grey(tmp_path):
    make_folder(tmp_path / "train", {"a": 2}, mode="L")
    make_folder(tmp_path / "test", {"a": 2}, mode="RGB")
    cfg = data_cfg(name="imagefolder", root=str(tmp_path))
    grey = build_dataset(cfg, "train")[0][0]
    as_rgb = build_dataset(cfg, "train", in_chans=3)[0][0]
    assert grey.mode == "L" and as_rgb.mode == "RGB"
    arr = np.asarray(as_rgb)
    np.testing.assert_array_equal(arr[..., 0], np.asarray(grey))
    np.testing.assert_array_equal(arr[..., 1], arr[..., 2])
    as_grey = build_dataset(cfg, "test", in_chans=1)[0][0]
    assert as_grey.mode == "L" and np.asarray(as_grey).shape == (10, 12)


def test_check_dataset_size(tmp_path):
    make_folder(tmp_path / "train", {"a": 3, "b": 2})
    ds = build_dataset(data_cfg(name="imagefolder", root=str(tmp_path)), "train")
    check_dataset_size(ds, 5)
    with pytest.raises(DatasetError, match="5 images is fewer than one batch of 8"):
        check_dataset_size(ds, 8)
    with pytest.raises(DatasetError, match="empty"):
        check_dataset_size([], 1, "nothing")


# --- pretraining splits ----------------------------------------------------------------------


def test_pretrain_split_inductive_and_transductive(caplog):
    assert pretrain_split(data_cfg(name="flowers")) == ("train", "val")
    assert pretrain_split(data_cfg(name="pets")) == ("trainval",)
    assert pretrain_split(data_cfg(name="demo")) == ("train",)
    assert "TRANSDUCTIVE" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="scott.data.datasets"):
        assert pretrain_split(data_cfg(name="pets", transductive=True)) == ("trainval", "test")
    assert "TRANSDUCTIVE" in caplog.text and "TEST images" in caplog.text


def test_build_pretrain_dataset_transductive_demo():
    assert len(build_pretrain_dataset(data_cfg())) == 5000
    both = build_pretrain_dataset(data_cfg(transductive=True))
    assert len(both) == 6000
    np.testing.assert_array_equal(np.asarray(both[5000][0]), np.asarray(build_dataset(data_cfg(), "test")[0][0]))


# --- transforms ------------------------------------------------------------------------------


def pretrain_ds(img_size=32, in_chans=3, augment="paper", target_view="jitter", seed=0, target_shift=0):
    recipe = default_recipe()  # a plain dict of the defaults
    recipe["model"].update(img_size=img_size, in_chans=in_chans)
    recipe["data"].update(augment=augment)
    recipe["objective"].update(target_view=target_view, target_shift=target_shift)
    return PretrainDataset(build_dataset(recipe["data"], "train"), build_pretrain_transform(recipe), seed)


def test_pretrain_views_are_reproducible():
    ds = pretrain_ds()
    a_ctx, a_tgt = ds[(3, 17)]
    b_ctx, b_tgt = ds[(3, 17)]
    assert a_ctx.shape == a_tgt.shape == (3, 32, 32) and a_ctx.dtype == torch.float32
    assert torch.equal(a_ctx, b_ctx) and torch.equal(a_tgt, b_tgt)
    # a fresh dataset object (e.g. after resume, in another worker) gives the same views
    c_ctx, c_tgt = pretrain_ds()[(3, 17)]
    assert torch.equal(a_ctx, c_ctx) and torch.equal(a_tgt, c_tgt)
    # plain int index = epoch 0
    assert torch.equal(ds[17][0], ds[(0, 17)][0])


def test_pretrain_views_change_with_epoch_index_and_seed():
    ds = pretrain_ds()
    base = ds[(0, 5)][0]
    assert not torch.equal(base, ds[(1, 5)][0])
    assert not torch.equal(base, pretrain_ds(seed=1)[(0, 5)][0])
    diffs = [float((ds[(e, 5)][0] - base).abs().mean()) for e in range(1, 6)]
    assert min(diffs) > 0.01


def test_target_view_jitter_vs_same():
    jitter, same = pretrain_ds(target_view="jitter"), pretrain_ds(target_view="same")
    differing = sum(not torch.equal(*jitter[i]) for i in range(40))
    assert 15 <= differing <= 40  # the colour block is drawn independently per view
    assert all(torch.equal(*same[i]) for i in range(10))
    # same geometry in both views: the light transform gives identical views too
    light = pretrain_ds(augment="light")
    assert all(torch.equal(*light[i]) for i in range(5))


def test_translate_replicate_moves_content_and_clamps_at_the_edges():
    x = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 4, 5)
    for dy, dx in [(0, 0), (1, -2), (-3, 4), (2, 2)]:
        y = translate_replicate(x, dy, dx)
        expected = torch.empty_like(x)
        for i in range(4):
            for j in range(5):
                expected[:, i, j] = x[:, min(max(i + dy, 0), 3), min(max(j + dx, 0), 4)]
        assert torch.equal(y, expected)
    assert translate_replicate(x, 0, 0) is not x


def test_target_shift_translates_the_target_view_only():
    plain, shifted = pretrain_ds(target_view="same"), pretrain_ds(target_view="same", target_shift=3)
    offsets = set()
    for i in range(30):
        ctx, tgt = shifted[(0, i)]
        assert torch.equal(ctx, plain[(0, i)][0])  # the context view is what it was without the shift
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if torch.allclose(translate_replicate(ctx, dy, dx), tgt, atol=1e-6)]
        assert found, "the target view is a translation of the context view by at most 3 px"
        offsets.add(found[0])
    assert len(offsets) >= 10  # offsets are drawn, not fixed
    assert max(max(abs(dy), abs(dx)) for dy, dx in offsets) <= 3
    # reproducible from (seed, epoch, index)
    again = pretrain_ds(target_view="same", target_shift=3)
    assert all(torch.equal(shifted[(2, i)][1], again[(2, i)][1]) for i in range(5))
    with pytest.raises(ValueError, match="target_shift"):
        TwoViewTransform(16, 1, target_shift=8)


def test_grey_28px_colour_ops_work_in_1_and_3_channels():
    for chans in (1, 3):
        ds = pretrain_ds(img_size=28, in_chans=chans)
        views = [ds[(0, i)] for i in range(30)]
        assert all(v.shape == (chans, 28, 28) for pair in views for v in pair)
        assert all(torch.isfinite(v).all() for pair in views for v in pair)


def test_augment_none_equals_eval_transform():
    ds = pretrain_ds(augment="none", img_size=32, in_chans=3)
    img = build_dataset(data_cfg(), "train")[9][0]
    expected = eval_transform(32, 3)(img)
    ctx, tgt = ds[(4, 9)]
    torch.testing.assert_close(ctx, expected)
    torch.testing.assert_close(tgt, expected)


def test_random_crop_covers_requested_scale():
    transform = TwoViewTransform(64, 3, crop_scale=(1.0, 1.0), augment="light")
    img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3)))
    ctx, _ = transform(img, torch.Generator().manual_seed(0))
    # scale 1 on a square image -> the whole image (possibly flipped): a horizontal ramp
    row = ctx[0, 32]
    assert abs(float(row[0] - row[-1])) > 3.0


def test_eval_transform_spec_round_trip():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    spec = eval_transform_spec({"img_size": 224, "in_chans": 3})
    assert (spec["resize"], spec["img_size"], spec["in_chans"]) == (256, 224, 3)
    assert spec["mean"] == pytest.approx([0.485, 0.456, 0.406])
    rebuilt = transform_from_spec(json.loads(json.dumps(spec)))
    out = rebuilt(img)
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, eval_transform(224, 3)(img))
    small = eval_transform_spec({"img_size": 28, "in_chans": 1})
    assert (small["resize"], small["mean"], small["std"]) == (28, [0.5], [0.5])
    grey = transform_from_spec(small)(build_dataset(data_cfg(), "test")[0][0])
    assert grey.shape == (1, 28, 28) and -1.0 <= float(grey.min()) and float(grey.max()) <= 1.0


# --- stratified split ------------------------------------------------------------------------


def test_split_train_val_stratified_disjoint_deterministic():
    labels = np.repeat(np.arange(10), 50)
    np.random.default_rng(3).shuffle(labels)
    train, val = split_train_val(labels, 0.1, seed=0)
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(500))
    np.testing.assert_array_equal(np.bincount(labels[val]), [5] * 10)
    again_train, again_val = split_train_val(labels, 0.1, seed=0)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(val, split_train_val(labels, 0.1, seed=1)[1])


def test_split_train_val_small_classes():
    labels = np.array([0, 0, 1, 1, 1, 2])
    train, val = split_train_val(labels, 0.1, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=3), [1, 1, 0])
    assert set(labels[train]) == {0, 1, 2}
