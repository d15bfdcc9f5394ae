"""Every CLI turns data errors into one line on stderr naming the file or key, exit status 2.

Most cases run the tools' ``main`` in-process through ``run_cli`` (what ``python tools/X.py``
does); the headline commands and the DataLoader-worker case run as real subprocesses so the
absence of a traceback is checked on the actual stderr.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scott.checkpoint import export_encoder
from scott.config import format_recipe, load_recipe
from scott.data.datasets import BadImageError, ImageFileDataset, scan_image_folder
from scott.data.transforms import eval_transform_spec
from scott.models import build_encoder
from cli_helpers import exit_code, load_tool

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
EVAL_TOOLS = ("eval_knn", "eval_linear", "eval_attentive", "finetune")
TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.predictor_dim=32",
        "model.predictor_depth=1", "model.hidden_dim=8", "data.num_workers=0"]


def run_tool(name, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``tools/<name>.py argv`` run in-process through run_cli."""
    return exit_code(load_tool(name), argv), capsys.readouterr().err


def run_subprocess(argv, cwd=None, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **env)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=300)


def one_error_line(stderr: str, *fragments: str) -> str:
    """The single 'error:' line of stderr; asserts the fragments are in it and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def image_folder(root: Path, per_class: int = 12, classes=("a", "b"), splits=("train", "test")) -> Path:
    for split in splits:
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i:03d}.jpg").write_bytes(jpeg_bytes(1000 * c + i))
    return root


def truncate(path: Path) -> Path:
    """Cut a JPEG in half: the header and PIL's verify() still pass, decoding the pixels fails."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as img:
        img.verify()  # the trap: verify() does not decode pixels
    return path


def folder_recipe(tmp_path: Path, root: Path, **data) -> Path:
    lines = [f"  {k}: {v}" for k, v in {"name": "imagefolder", "root": str(root), "augment": "none",
                                         "num_workers": 0, **data}.items()]
    text = ("data:\n" + "\n".join(lines) + "\n"
            "model:\n  tokenizer: small\n  img_size: 16\n  patch_size: 4\n  in_chans: 3\n  embed_dim: 32\n"
            "  depth: 1\n  num_heads: 2\n  hidden_dim: 8\n  predictor_depth: 1\n"
            "mask:\n  min_block: 2\n"
            "optim:\n  batch_size: 8\n  warmup_epochs: 0\n"
            "train:\n  max_steps: 2\n  checkpoint_every: 2\n")
    path = tmp_path / "folder.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- missing / empty data.root
def test_pretrain_demo_missing_root_is_one_line(tmp_path):
    """The issue's example: a traceback with exit 1 before."""
    proc = run_subprocess([str(ROOT / "tools" / "pretrain.py"), str(DEMO), "--set", "data.root=/nonexistent",
                           "--output", str(tmp_path / "run")])
    assert proc.returncode == 2
    one_error_line(proc.stderr, "demo.yaml", "data.root", "/nonexistent", "does not exist")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["demo", "fashion_mnist"])
def test_pretrain_empty_root_names_the_idx_files(tmp_path, capsys, name):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_tool("pretrain", [str(DEMO), "--set", f"data.name={name}", "--set", f"data.root={empty}",
                                      "--output", str(tmp_path / "run"), "--no-knn"], capsys)
    assert code == 2
    one_error_line(err, "data.root", str(empty), "train-images-idx3-ubyte")


@pytest.mark.parametrize("name", ["flowers", "pets"])
def test_pretrain_torchvision_dataset_empty_root(tmp_path, capsys, name):
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = ROOT / "recipes" / f"{name}.yaml"
    code, err = run_tool("pretrain", [str(recipe), "--set", f"data.root={empty}", "--set", "data.download=false",
                                      *[f"--set={o}" for o in TINY], "--output", str(tmp_path / "run"),
                                      "--no-knn"], capsys)
    assert code == 2
    one_error_line(err, "data.root", str(empty))


def test_pretrain_flowers_download_without_network(tmp_path):
    """The design card's headline command on a machine without the data and without network."""
    proxy = "http://127.0.0.1:9"  # discard port: the download fails at once, network or not
    proc = run_subprocess([str(ROOT / "tools" / "pretrain.py"), str(ROOT / "recipes" / "flowers.yaml"),
                           *[f"--set={o}" for o in TINY], "--output", str(tmp_path / "run"), "--no-knn"],
                          cwd=tmp_path, HTTPS_PROXY=proxy, https_proxy=proxy, HTTP_PROXY=proxy, http_proxy=proxy)
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error_line(proc.stderr, "data.download", "Flowers102", "data/flowers", "data.root")


@pytest.mark.parametrize("tool", EVAL_TOOLS)
def test_eval_tools_missing_root(tmp_path, capsys, tool):
    code, err = run_tool(tool, ["--random-init", str(DEMO), "--set", f"data.root={tmp_path / 'nope'}"], capsys)
    assert code == 2
    one_error_line(err, "data.root", str(tmp_path / "nope"))


@pytest.fixture()
def run_dir_with_root(tmp_path):
    """A run folder whose recipe points data.root at a folder that is gone."""
    def make(root: Path, extra=()):
        path = tmp_path / "run"
        path.mkdir()
        recipe = load_recipe(DEMO, [*TINY, *extra, f"data.root={root}"], check_data=False)
        (path / "recipe.yaml").write_text(format_recipe(recipe), encoding="utf-8")
        torch.manual_seed(0)
        for name in ("encoder", "context_encoder"):
            export_encoder(path / f"{name}.safetensors", build_encoder(recipe["model"]).state_dict(),
                           recipe["model"], eval_transform_spec(recipe["model"]))
        return path
    return make


def test_visualize_missing_root(tmp_path, capsys, run_dir_with_root):
    run_dir = run_dir_with_root(tmp_path / "gone")
    code, err = run_tool("visualize", [str(run_dir)], capsys)
    assert code == 2
    one_error_line(err, "data.root", str(tmp_path / "gone"))


# ----------------------------------------------------------------------------- folders, sizes, bad images
def test_folder_without_images(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs")
    for f in (root / "train" / "b").iterdir():
        f.unlink()
    code, err = run_tool("pretrain", [str(folder_recipe(tmp_path, root)), "--output", str(tmp_path / "run"),
                                      "--no-knn"], capsys)
    assert code == 2
    one_error_line(err, "data.root", str(root / "train" / "b"), "has no images")


def test_folder_without_class_folders(tmp_path, capsys):
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    code, err = run_tool("eval_knn", ["--random-init", str(folder_recipe(tmp_path, tmp_path / "imgs"))], capsys)
    assert code == 2
    one_error_line(err, "data.root", str(tmp_path / "imgs" / "train"), "no class folders")


def test_dataset_smaller_than_a_batch(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", per_class=3)  # 6 images, batch 8
    code, err = run_tool("pretrain", [str(folder_recipe(tmp_path, root)), "--output", str(tmp_path / "run"),
                                      "--no-knn"], capsys)
    assert code == 2
    one_error_line(err, "6 images", "one batch of 8", "optim.batch_size")


def test_bad_image_in_a_dataloader_worker_is_one_line(tmp_path):
    root = image_folder(tmp_path / "imgs")
    bad = truncate(root / "train" / "a" / "005.jpg")
    recipe = folder_recipe(tmp_path, root, num_workers=1, on_bad_image="error")
    proc = run_subprocess([str(ROOT / "tools" / "pretrain.py"), str(recipe), "--output", str(tmp_path / "run"),
                           "--no-knn"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr, str(bad), "truncated", "data.on_bad_image: skip")
    assert "worker" in line and "Original" not in line


def test_bad_image_in_eval_worker(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs")
    bad = truncate(root / "test" / "b" / "002.jpg")
    code, err = run_tool("eval_knn", ["--random-init", str(folder_recipe(tmp_path, root)), "--num-workers", "1",
                                      "--k", "3"], capsys)
    assert code == 2
    one_error_line(err, str(bad), "cannot read image")


def test_skip_scan_decodes_pixels_and_names_each_file_once(tmp_path, caplog):
    root = image_folder(tmp_path / "imgs", per_class=5)
    bad = [truncate(root / "train" / "a" / "001.jpg"), root / "train" / "b" / "003.jpg"]
    bad[1].write_bytes(b"not an image at all")
    paths, labels, classes = scan_image_folder(root / "train")
    with caplog.at_level(logging.WARNING, logger="scott.data.datasets"):
        ds = ImageFileDataset(paths, labels, classes, on_bad_image="skip", description="train")
        again = ImageFileDataset(paths, labels, classes, on_bad_image="skip", description="train")
    assert len(ds) == len(again) == 8 and not set(bad) & set(ds.paths)
    assert list(ds.labels) == [0, 0, 0, 0, 1, 1, 1, 1]
    messages = [r.getMessage() for r in caplog.records]
    for path in bad:
        assert sum(str(path) in m for m in messages) == 1, messages  # named once, also over two scans
    assert sum("skipped 2 of 10 images" in m for m in messages) == 2  # the total at the end of each scan
    for i in range(len(ds)):  # every kept file decodes: training never meets a bad one
        assert ds[i][0].size == (32, 32)


def test_error_policy_names_the_file(tmp_path):
    root = image_folder(tmp_path / "imgs", per_class=2, splits=("train",))
    bad = truncate(root / "train" / "b" / "001.jpg")
    paths, labels, classes = scan_image_folder(root / "train")
    ds = ImageFileDataset(paths, labels, classes, on_bad_image="error")
    with pytest.raises(BadImageError, match="001.jpg: cannot read image"):
        ds[ds.paths.index(bad)]
