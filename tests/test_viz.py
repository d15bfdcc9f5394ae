"""PIL figures: sizes, content that reflects the inputs, and the run-folder figure writer."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from scott.viz import (
    PALETTE,
    curve_series,
    denormalize,
    line_chart,
    mask_figure,
    pca_figure,
    pca_rgb,
    read_metrics,
    training_curves,
    write_run_figures,
)


def gradient_image(size=28):
    arr = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))
    return Image.fromarray(np.stack([arr, arr.T, 255 - arr], axis=-1), mode="RGB")


def test_mask_figure_size_and_content():
    visible = torch.zeros(2, 4, 4, dtype=torch.bool)
    visible[:, :2, :] = True  # top half visible
    target = ~visible
    fig = mask_figure([gradient_image(), gradient_image()], visible, target, panel=64)
    assert fig.size == (3 * 64 + 4 * 4, 2 * 64 + 3 * 4)
    a = np.asarray(fig).astype(int)
    original = a[4:68, 4:68]
    masked = a[4:68, 72:136]
    token_map = a[4:68, 140:204]
    # visible (top) half of the masked panel is the image; the hidden half is changed
    assert np.array_equal(masked[:30], original[:30])
    assert np.abs(masked[34:] - original[34:]).mean() > 40
    # token map: top half white, bottom half red (targets); grey grid lines between cells
    top_white = (token_map[:32] == 255).all(axis=-1).mean()
    bottom_red = (token_map[32:] == (220, 50, 47)).all(axis=-1).mean()
    assert top_white > 0.85 and bottom_red > 0.85
    assert not (token_map[:32] == (220, 50, 47)).all(axis=-1).any()
    assert not (token_map[32:] == 255).all(axis=-1).any()


def test_pca_rgb_separates_two_feature_groups():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    tokens = torch.empty(1, 16, 16)
    grid_cols = torch.arange(16) % 4
    tokens[0, grid_cols < 2] = a
    tokens[0, grid_cols >= 2] = b
    tokens += 0.01 * torch.randn(tokens.shape, generator=gen)
    rgb = pca_rgb(tokens, (4, 4)).astype(int)
    assert rgb.shape == (1, 4, 4, 3) and rgb.dtype == np.int64
    left, right = rgb[0, :, :2].reshape(-1, 3), rgb[0, :, 2:].reshape(-1, 3)
    # first component splits the halves: colours across halves differ a lot, within a half little
    assert np.abs(left.mean(0) - right.mean(0)).max() > 150
    fig = pca_figure([gradient_image()], tokens, (4, 4), panel=40)
    assert fig.size == (2 * 40 + 3 * 4, 40 + 2 * 4)
    with pytest.raises(ValueError):
        pca_rgb(tokens, (3, 4))


def test_line_chart_draws_a_rising_curve():
    xs = list(range(0, 101, 10))
    chart = line_chart({"loss": (xs, [x * 0.01 for x in xs])}, title="t", size=(400, 300))
    assert chart.size == (400, 300)
    a = np.asarray(chart)
    hits = np.argwhere((a == PALETTE[0]).all(axis=-1))
    plot = hits[hits[:, 1] < 400 - 160]  # leave out the legend swatch
    assert len(plot) > 100
    left_y = plot[plot[:, 1] < plot[:, 1].min() + 10][:, 0].mean()
    right_y = plot[plot[:, 1] > plot[:, 1].max() - 10][:, 0].mean()
    assert left_y > right_y + 100  # image y grows downwards: rising values go up
    with pytest.raises(ValueError):
        line_chart({})


def test_read_metrics_and_curves(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": 10 * i, "loss": 1.0 / (i + 1), "lr": 1e-3} for i in range(5)]
    recs[2]["knn_top1"] = 0.5
    recs[4]["knn_top1"] = 0.6
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"step\": 50, \"lo", encoding="utf-8")
    records = read_metrics(path)
    assert len(records) == 5
    series = curve_series(records, ["loss", "knn_top1", "missing"])
    assert series["knn_top1"] == ([20.0, 40.0], [0.5, 0.6])
    assert "missing" not in series and len(series["loss"][0]) == 5
    charts = training_curves(records)
    assert set(charts) == {"loss", "knn"}


def test_denormalize_roundtrip():
    x = torch.rand(1, 5, 5)
    img = denormalize((x - 0.5) / 0.5, [0.5], [0.5])
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (5, 5, 3)
    assert np.abs(arr[..., 0] / 255.0 - x[0].numpy()).max() < 1 / 255 + 1e-6


def test_write_run_figures(tmp_path):
    from scott.checkpoint import export_encoder
    from scott.config import format_recipe, load_recipe
    from scott.data.transforms import eval_transform_spec
    from scott.models import build_encoder

    recipe = load_recipe("recipes/demo.yaml", ["model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                                               "train.export_encoder=target"])  # the one encoder written here
    (tmp_path / "recipe.yaml").write_text(format_recipe(recipe), encoding="utf-8")
    torch.manual_seed(0)
    enc = build_encoder(recipe["model"])
    export_encoder(tmp_path / "encoder.safetensors", enc.state_dict(), recipe["model"],
                   eval_transform_spec(recipe["model"]))
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 1 / (s + 1)}) for s in range(20)) + "\n", encoding="utf-8")
    paths = write_run_figures(tmp_path, num_images=3, log=lambda s: None, pca_images=16)
    names = sorted(p.name for p in paths)
    assert names == ["loss.png", "masks.png", "pca.png", "pca_raw.png"]
    masks = Image.open(tmp_path / "figures" / "masks.png")
    assert masks.size == (3 * 160 + 4 * 4, 3 * 160 + 4 * 4)
    pca = np.asarray(Image.open(tmp_path / "figures" / "pca.png")).astype(int)
    assert pca.shape == (3 * 160 + 4 * 4, 2 * 160 + 3 * 4, 3)
    pca_panel = pca[4:164, 168:328]
    assert pca_panel.std() > 20  # the PCA map is not flat
