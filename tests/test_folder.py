"""Your own images: a plain folder in (data.name: folder), embeddings and neighbours out."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scott.config import RecipeError, load_recipe
from scott.data.datasets import DatasetError, IMAGE_EXTENSIONS, build_dataset, build_pretrain_dataset, has_labels
from scott.data.folder import UNLABELLED, scan_folder, write_images
from cli_helpers import exit_code, load_tool
from train_helpers import one_torch_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.hidden_dim=8", "model.in_chans=1",
         "model.predictor_dim=32", "optim.batch_size=8", "data.num_workers=0", "train.checkpoint_every=2"]


def _png(path, value=128, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


# ----------------------------------------------------------------------------- scanning rules
def test_scan_finds_images_at_any_depth_in_sorted_order_and_ignores_the_rest(tmp_path):
    for rel in ("b.png", "a/z.JPG", "a/c/d.png", "a/c/e.tif"):
        _png(tmp_path / rel) if not rel.endswith(("JPG", "tif")) else Image.new("RGB", (4, 4)).save(
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True) or tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    _png(tmp_path / ".hidden.png")
    _png(tmp_path / ".cache" / "x.png")
    scan = scan_folder(tmp_path, IMAGE_EXTENSIONS)
    assert scan.relative == ["a/c/d.png", "a/c/e.tif", "a/z.JPG", "b.png"]
    assert not scan.labelled and (scan.labels == UNLABELLED).all()  # an image sits in root: no classes


def test_symlinks_are_followed_once(tmp_path):
    _png(tmp_path / "real" / "x.png")
    os.symlink(tmp_path / "real", tmp_path / "link")          # the same folder twice
    os.symlink(tmp_path, tmp_path / "real" / "up")            # a loop
    scan = scan_folder(tmp_path, IMAGE_EXTENSIONS)
    assert len(scan.relative) == 1 and scan.relative[0] in ("link/x.png", "real/x.png")


def test_class_folders_give_labels_only_with_two_or_more(tmp_path):
    _png(tmp_path / "cats" / "1.png")
    _png(tmp_path / "cats" / "deep" / "2.png")
    _png(tmp_path / "dogs" / "3.png")
    scan = scan_folder(tmp_path, IMAGE_EXTENSIONS)
    assert scan.classes == ["cats", "dogs"] and scan.labels.tolist() == [0, 0, 1]
    one = tmp_path / "one"
    _png(one / "only" / "1.png")
    assert not scan_folder(one, IMAGE_EXTENSIONS).labelled
    # first-level folders that are not classes (dates, batches): data.class_folders: false
    assert not scan_folder(tmp_path, IMAGE_EXTENSIONS, class_folders=False).labelled
    named = build_dataset({"name": "folder", "root": str(tmp_path)}, "train")
    assert "labels from 3 class folders: cats, dogs, one" in named.description  # "one" is inside tmp_path
    plain = build_dataset({"name": "folder", "root": str(tmp_path), "class_folders": False}, "train")
    assert not has_labels(plain) and "unlabelled" in plain.description


def test_missing_or_empty_folders_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match="data.root: folder .* does not exist"):
        build_dataset({"name": "folder", "root": str(tmp_path / "nope")}, "train")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="data.root: no images under"):
        build_dataset({"name": "folder", "root": str(tmp_path / "empty")}, "train")
    with pytest.raises(DatasetError, match="data.root: required"):
        build_dataset({"name": "folder"}, "train")


def test_recipe_rules_for_a_folder(tmp_path):
    recipe = ROOT / "recipes" / "folder_cpu.yaml"
    with pytest.raises(RecipeError, match="data.root: required for data.name 'folder'"):
        load_recipe(recipe)
    with pytest.raises(RecipeError, match="data.root: folder .* does not exist"):
        load_recipe(recipe, [f"data.root={tmp_path / 'gone'}"])
    with pytest.raises(RecipeError, match="data.eval_split: 'folder' has no test split"):
        load_recipe(recipe, [f"data.root={tmp_path}", "data.eval_split=test"])


def test_unlabelled_folder_pretrains_but_refuses_knn(tmp_path):
    from scott.data.eval_splits import bank_and_queries

    for i in range(4):
        _png(tmp_path / f"g{i % 2}" / "sub" / f"{i}.png", value=40 * i)
    _png(tmp_path / "loose.png")
    cfg = {"name": "folder", "root": str(tmp_path)}
    data = build_pretrain_dataset(cfg, in_chans=1)
    assert len(data) == 5 and not has_labels(data)
    assert data[0][0].mode == "L" and data[0][1] == UNLABELLED
    with pytest.raises(DatasetError, match="has no labels; kNN and probes need class folders"):
        bank_and_queries(dict(cfg, eval_split="val"), "val", 0)


# ----------------------------------------------------------------------------- end to end (small)
@pytest.fixture(scope="module")
def demo_folders(tmp_path_factory):
    from scott.data.datasets import build_dataset as build

    base = tmp_path_factory.mktemp("own")
    demo = build({"name": "demo"}, "train")
    write_images(demo, base / "nested", "nested", limit=48)
    write_images(demo, base / "classes", "classes", limit=48)
    return base, demo


def test_written_demo_images_are_the_demo_images(demo_folders):
    base, demo = demo_folders
    scan = scan_folder(base / "nested", IMAGE_EXTENSIONS)
    assert len(scan.relative) == 48 and scan.relative[0] == "part_00/group_0/00000.png" and not scan.labelled
    assert np.array_equal(np.asarray(Image.open(scan.paths[7])), np.asarray(demo[7][0]))
    classes = scan_folder(base / "classes", IMAGE_EXTENSIONS)
    assert classes.labelled and len(classes.classes) == len(set(int(demo[i][1]) for i in range(48)))


def test_pretrain_on_a_nested_folder_then_embed_and_look(demo_folders, tmp_path, capsys):
    base, _ = demo_folders
    run = tmp_path / "run"
    assert exit_code(load_tool("pretrain"), ["recipes/folder_cpu.yaml", "--output", str(run),
                                     "--set", f"data.root={base / 'nested'}", "--set", "train.max_steps=2",
                                     "--set", "data.class_folders=false",
                                     *sum((["--set", s] for s in SMALL), [])]) == 0
    out = capsys.readouterr().out
    assert "kNN report skipped: the images have no labels" in out
    assert "kNN monitor" in out  # the monitor (monitor_every: 3) says it is off
    assert "pretraining data: 48 images, folder" in out and "unlabelled" in out

    emb_file = tmp_path / "emb" / "feats"
    assert exit_code(load_tool("embed"), [str(run), str(base / "classes"), "--out", str(emb_file), "--batch-size", "16",
                                          "--which", "target"]) == 0
    from scott.eval.embed import read_embeddings
    from scott.eval.features import extract_features, load_encoder

    emb = read_embeddings(emb_file)
    assert len(emb.paths) == 48 and emb.paths == sorted(emb.paths) and emb.pool == "flat"
    # the same numbers as the kNN evaluation's features of the same images
    encoder = load_encoder(run, which="target")
    ds = build_dataset({"name": "folder", "root": str(base / "classes")}, "train", in_chans=1)
    ref, labels = extract_features(encoder, ds, progress=False)
    assert torch.allclose(emb.features, ref, atol=1e-6) and torch.equal(emb.labels, labels)
    assert np.allclose(np.load(emb_file.with_suffix(".npy")), ref.numpy(), atol=1e-6)
    rows = list(csv.DictReader(open(emb_file.with_suffix(".csv"))))
    assert [r["path"] for r in rows] == emb.paths and rows[0]["class"] == emb.classes[int(rows[0]["label"])]

    grid, pca = tmp_path / "grid.png", tmp_path / "map.png"
    assert exit_code(load_tool("neighbours"), [str(run), str(base / "classes"), "--queries", "3", "--k", "4",
                                       "--out", str(grid), "--map", str(pca), "--thumb", "32"]) == 0
    out = capsys.readouterr().out
    assert "share their query's class folder" in out
    with Image.open(grid) as g:
        assert g.size[1] > 3 * 32 and g.size[0] > 5 * 32  # 3 rows of query + 4 neighbours
    assert Image.open(pca).size[0] > 400
    assert exit_code(load_tool("neighbours"), [str(run), str(base / "classes"), "--k", "48"]) == 2  # only 47 others
    # --whiten D: the same neighbours as nearest_neighbours on the folder's whitened embeddings
    from scott.eval.embed import nearest_neighbours
    from scott.eval.whitening import fit_whitening

    assert exit_code(load_tool("neighbours"), [str(run), str(base / "classes"), "--queries", "8", "--k", "5",
                                               "--whiten", "20", "--which", "target", "--out", str(grid)]) == 0
    queries = torch.randperm(48, generator=torch.Generator().manual_seed(0))[:8].tolist()
    white = fit_whitening(emb.features, 20)
    idx, _ = nearest_neighbours(white(emb.features), queries, 5)
    same = 100 * float((emb.labels[idx] == emb.labels[torch.tensor(queries)].unsqueeze(1)).float().mean())
    assert f"{same:.1f} % of the neighbours share" in capsys.readouterr().out
    plain, _ = nearest_neighbours(emb.features, queries, 5)
    assert not torch.equal(plain, idx)  # whitening changed who the neighbours are
    assert exit_code(load_tool("neighbours"), [str(run), str(base / "classes"), "--whiten", "48"]) == 2
    # the run's shareable model folder holds the encoder the recipe exports (train.export_encoder:
    # context in folder_cpu.yaml) and embeds the same images to the same vectors as that encoder
    assert (run / "export" / "config.json").is_file()
    assert exit_code(load_tool("embed"), [str(run / "export"), str(base / "classes"), "--out", str(tmp_path / "hf")]) == 0
    assert exit_code(load_tool("embed"), [str(run), str(base / "classes"),  # no --which: the exported one
                                          "--out", str(tmp_path / "ctx")]) == 0
    exported = read_embeddings(tmp_path / "hf").features
    assert torch.allclose(exported, read_embeddings(tmp_path / "ctx").features, atol=1e-6)
    assert not torch.allclose(exported, emb.features, atol=1e-3)  # emb: --which target
    assert exit_code(load_tool("embed"), [str(run), str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert exit_code(load_tool("embed"), [str(tmp_path / "norun"), str(base / "classes"), "--out", str(tmp_path / "x")]) == 2


def test_nearest_neighbours_on_known_vectors():
    from scott.eval.embed import nearest_neighbours

    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, -0.1]])
    idx, sims = nearest_neighbours(feats, [0, 2], k=2)
    assert idx.tolist() == [[1, 2], [1, 0]]
    assert sims[0, 0] == pytest.approx(0.9 / np.hypot(0.9, 0.1))
    with pytest.raises(ValueError):
        nearest_neighbours(feats, [0], k=4)


def test_a_folder_of_the_demo_images_trains_exactly_like_the_demo(tmp_path):
    """The same images through data.name: folder (PNG files, sorted paths) and the embedded demo
    arrays: same recipe, same steps, bit-identical weights."""
    from scott import checkpoint as ck
    from scott.data.datasets import build_dataset as build
    from scott.train import pretrain

    write_images(build({"name": "demo"}, "train"), tmp_path / "imgs", "nested")
    steps = ["train.max_steps=3", "train.checkpoint_every=3", "train.monitor_every=0", "data.num_workers=0"]
    demo = load_recipe(ROOT / "recipes" / "demo.yaml", steps)
    folder = load_recipe(ROOT / "recipes" / "folder_cpu.yaml",
                         [*steps, f"data.root={tmp_path / 'imgs'}", "model.in_chans=1"])
    assert {k: v for k, v in folder.to_dict().items() if k not in ("data", "name")} == \
        {k: v for k, v in demo.to_dict().items() if k not in ("data", "name")}
    weights = []
    for name, recipe in (("demo", demo), ("folder", folder)):
        pretrain(recipe, tmp_path / name, log=lambda m: None)
        weights.append(ck.load_tensors(tmp_path / name / "checkpoints" / "step_00000003" / "model.safetensors")[0])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_full_walk_through_from_a_folder_to_neighbours_and_a_shared_model(tmp_path, capsys):
    """docs/own_images.md end to end with the shipped recipe (6 epochs): the folder-pretrained
    encoder equals the demo recipe's (the same images), and every tool works on it."""
    import timm

    import scott
    from scott.eval.features import load_encoder
    from scott.train import pretrain

    mine, test = tmp_path / "my_images", tmp_path / "my_test"
    assert exit_code(load_tool("demo_to_folder"), [str(mine)]) == 0
    assert exit_code(load_tool("demo_to_folder"), [str(test), "--split", "test", "--layout", "classes"]) == 0
    run = tmp_path / "run"
    assert exit_code(load_tool("pretrain"), ["recipes/folder_cpu.yaml", "--set", f"data.root={mine}", "--set",
                                     "data.class_folders=false", "--set", "model.in_chans=1", "--output", str(run)]) == 0
    demo_run = tmp_path / "demo"
    pretrain(load_recipe(ROOT / "recipes" / "demo.yaml", ["train.monitor_every=0"]), demo_run, log=lambda m: None)
    a, b = load_encoder(run).state_dict(), load_encoder(demo_run).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same training, image for image

    knn = load_tool("eval_knn")
    for source, out in ((run, tmp_path / "folder.json"), (demo_run, tmp_path / "demo.json")):
        assert exit_code(knn, [str(source), "--set", "data.name=demo", "--set", "data.root=null", "--set",
                           "data.eval_split=test", "--k", "20", "--json", str(out)]) == 0
    folder_knn = json.loads((tmp_path / "folder.json").read_text())["k"]["20"]["top1"]
    assert folder_knn == json.loads((tmp_path / "demo.json").read_text())["k"]["20"]["top1"]

    assert exit_code(load_tool("embed"), [str(run), str(mine), "--out", str(tmp_path / "emb")]) == 0
    assert exit_code(load_tool("neighbours"), [str(run), str(test), "--out", str(tmp_path / "n.png"),
                                       "--map", str(tmp_path / "m.png")]) == 0
    shared = scott.from_pretrained(run / "export")
    via_timm = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(shared(x), via_timm(x))
