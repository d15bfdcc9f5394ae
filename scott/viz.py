"""PNG figures drawn with PIL only (no matplotlib): masks, feature PCA, training curves.

Public API:
    denormalize(image [C,H,W], mean, std)              -> PIL RGB image
    mask_figure(images, visible, target=None, ...)      -> PIL image: image | masked image | token map
    pca_rgb(tokens [B, N, D], grid)                     -> uint8 [B, gh, gw, 3] (3 top components)
    pca_figure(images, tokens, grid, ...)               -> PIL image: image | PCA of its patch features
    line_chart(series, title, xlabel, size)             -> PIL image (axes, ticks, legend)
    bar_chart(groups, title, ylabel)                    -> PIL image (grouped bars, error bars)
    read_metrics(path)                                  -> list of records from metrics.jsonl
    curve_series(records, keys, x="step")               -> {key: (xs, ys)}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "denormalize",
    "upscale",
    "tile",
    "mask_figure",
    "pca_rgb",
    "pca_figure",
    "line_chart",
    "bar_chart",
    "read_metrics",
    "curve_series",
    "neighbour_grid",
    "embedding_map",
    "pca_2d",
    "PALETTE",
]

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207),
           (140, 86, 75), (127, 127, 127)]
_BG = (255, 255, 255)
_INK = (30, 30, 30)
_VISIBLE = (255, 255, 255)
_TARGET = (220, 50, 47)
_HIDDEN = (60, 60, 60)


# ----------------------------------------------------------------------------- images
def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Normalised tensor [C, H, W] (C = 1 or 3) -> PIL RGB image."""
    x = image.detach().float().cpu()
    m = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    arr = (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def upscale(img: Image.Image, size: int) -> Image.Image:
    """Nearest-neighbour resize to ``size`` x ``size`` (keeps patch edges sharp)."""
    return img.resize((size, size), Image.NEAREST)


def tile(rows: Sequence[Sequence[Image.Image]], pad: int = 4, bg=_BG) -> Image.Image:
    """Paste equally sized panels in a grid of rows with ``pad`` pixels between them."""
    if not rows or not rows[0]:
        raise ValueError("nothing to tile")
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (cols * w + (cols + 1) * pad, len(rows) * h + (len(rows) + 1) * pad), bg)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            out.paste(panel.convert("RGB").resize((w, h), Image.NEAREST), (pad + j * (w + pad), pad + i * (h + pad)))
    return out


def _token_map(visible: np.ndarray, target: np.ndarray | None, size: int) -> Image.Image:
    gh, gw = visible.shape
    arr = np.empty((gh, gw, 3), dtype=np.uint8)
    arr[:] = _HIDDEN
    if target is not None:
        arr[target] = _TARGET
    arr[visible] = _VISIBLE
    img = upscale(Image.fromarray(arr, mode="RGB"), size)
    draw = ImageDraw.Draw(img)
    for i in range(1, gh):
        y = round(i * size / gh)
        draw.line([(0, y), (size, y)], fill=(128, 128, 128))
    for j in range(1, gw):
        x = round(j * size / gw)
        draw.line([(x, 0), (x, size)], fill=(128, 128, 128))
    return img


def _masked_image(img: Image.Image, visible: np.ndarray, target: np.ndarray | None) -> Image.Image:
    gh, gw = visible.shape
    size = img.size[0]
    arr = np.asarray(img, dtype=np.float32)
    # patch index of every pixel (exact even when size is not a multiple of the grid)
    ys = (np.arange(size) * gh // size)[:, None]
    xs = (np.arange(size) * gw // size)[None, :]
    keep = visible[ys, xs]
    dim = arr * 0.25 + 0.75 * np.array(_HIDDEN, dtype=np.float32)
    out = np.where(keep[..., None], arr, dim)
    if target is not None:
        tgt = target[ys, xs]
        out = np.where(tgt[..., None], 0.6 * out + 0.4 * np.array(_TARGET, dtype=np.float32), out)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8), mode="RGB")


def mask_figure(images: Sequence[Image.Image], visible: torch.Tensor, target: torch.Tensor | None = None,
                panel: int = 160) -> Image.Image:
    """One row per image: the image, the image with masked patches dimmed (targets tinted red),
    and the visible-token map (white = visible, red = target, dark = other masked)."""
    if len(images) != visible.shape[0]:
        raise ValueError(f"{len(images)} images but {visible.shape[0]} masks")
    rows = []
    for i, img in enumerate(images):
        big = upscale(img.convert("RGB"), panel)
        v = visible[i].bool().cpu().numpy()
        t = None if target is None else target[i].bool().cpu().numpy()
        rows.append([big, _masked_image(big, v, t), _token_map(v, t, panel)])
    return tile(rows)


# ----------------------------------------------------------------------------- PCA
def pca_rgb(tokens: torch.Tensor, grid: Sequence[int], center: str = "global") -> np.ndarray:
    """Project patch features on their 3 top principal components (fit jointly over the batch).

    tokens [B, N, D] with N = gh * gw (row-major) -> uint8 [B, gh, gw, 3]; each component is
    stretched to [0, 255] between its 1st and 99th percentile. ``center="position"`` first removes
    each position's mean over the batch (hides the positional embedding, shows content; needs a
    batch of several images).
    """
    if center not in ("global", "position"):
        raise ValueError(f"center must be 'global' or 'position', got {center!r}")
    if tokens.ndim == 2:
        tokens = tokens[None]
    b, n, d = tokens.shape
    gh, gw = (int(g) for g in grid)
    if n != gh * gw:
        raise ValueError(f"{n} tokens do not fill a {gh}x{gw} grid")
    t = tokens.double()
    if center == "position":
        t = t - t.mean(dim=0, keepdim=True)
    x = t.reshape(b * n, d)
    x = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[: min(3, vh.shape[0])]
    proj = x @ comps.T  # [b*n, <=3]
    if proj.shape[1] < 3:
        proj = torch.cat([proj, torch.zeros(proj.shape[0], 3 - proj.shape[1], dtype=proj.dtype)], dim=1)
    lo = torch.quantile(proj, 0.01, dim=0)
    hi = torch.quantile(proj, 0.99, dim=0)
    scaled = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return (scaled.reshape(b, gh, gw, 3).numpy() * 255 + 0.5).astype(np.uint8)


def pca_figure(images: Sequence[Image.Image], tokens: torch.Tensor, grid: Sequence[int],
               panel: int = 160, center: str = "global") -> Image.Image:
    """One row per image: the image and the RGB PCA map of its patch features.

    ``tokens`` may hold more images than ``images`` (the PCA is fit on all, the first are shown).
    """
    maps = pca_rgb(tokens, grid, center)
    rows = [[upscale(img.convert("RGB"), panel), upscale(Image.fromarray(m, mode="RGB"), panel)]
            for img, m in zip(images, maps)]
    return tile(rows)


# ----------------------------------------------------------------------------- curves
def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file; blank or malformed lines (e.g. a torn last line) are skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def curve_series(records: Sequence[Mapping], keys: Sequence[str], x: str = "step") -> dict:
    """``{key: (xs, ys)}`` for every key with at least one finite value (records lacking it skipped)."""
    out = {}
    for key in keys:
        pts = [(_number(r.get(x)), _number(r.get(key))) for r in records]
        pts = [(a, b) for a, b in pts if a is not None and b is not None]
        if pts:
            out[key] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
               xlabel: str = "step", size: tuple[int, int] = (720, 420)) -> Image.Image:
    """Line chart of ``{name: (xs, ys)}`` with axes, tick labels, a title and a legend."""
    if not series:
        raise ValueError("no series to plot")
    w, h = size
    img = Image.new("RGB", size, _BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, 20, 34, 48
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline=_INK)
    for t in _nice_ticks(y0, y1):
        _, y = px(x0, t)
        draw.line([(left, y), (w - right, y)], fill=(225, 225, 225))
        draw.line([(left - 4, y), (left, y)], fill=_INK)
        draw.text((4, y - 6), _fmt(t), fill=_INK, font=font)
    for t in _nice_ticks(x0, x1):
        x, _ = px(t, y0)
        draw.line([(x, h - bottom), (x, h - bottom + 4)], fill=_INK)
        draw.text((x - 10, h - bottom + 8), _fmt(t), fill=_INK, font=font)
    draw.text(((w - 6 * len(xlabel)) / 2, h - 18), xlabel, fill=_INK, font=font)
    draw.text((left, 10), title, fill=_INK, font=font)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = [px(x, y) for x, y in zip(xs, ys)]
        if len(pts) == 1:
            cx, cy = pts[0]
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        else:
            draw.line(pts, fill=colour, width=2)
        if len(pts) <= 50:
            for cx, cy in pts:
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        ly = top + 8 + 14 * i
        draw.line([(w - right - 150, ly + 6), (w - right - 130, ly + 6)], fill=colour, width=3)
        draw.text((w - right - 125, ly), name, fill=_INK, font=font)
    return img


def bar_chart(groups: Mapping[str, Mapping[str, tuple[float, float]]], title: str = "", ylabel: str = "",
              size: tuple[int, int] | None = None) -> Image.Image:
    """Grouped bar chart: ``{group: {series: (value, spread)}}``; each series keeps one colour
    across groups, the spread is drawn as a +-error bar, the value is written above the bar."""
    if not groups or not any(groups.values()):
        raise ValueError("no bars to plot")
    names = list(dict.fromkeys(n for bars in groups.values() for n in bars))
    per_group = len(names)
    w = size[0] if size else max(480, 90 + len(groups) * (per_group * 22 + 30))
    h = size[1] if size else 420
    img = Image.new("RGB", (w, h), _BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 60, 140, 34, 40
    values = [v for bars in groups.values() for v, e in bars.values()] + \
             [v + e for bars in groups.values() for v, e in bars.values()]
    lows = [v - e for bars in groups.values() for v, e in bars.values()]
    y1 = max(values)
    y0 = min(0.0, min(lows)) if min(lows) < 0 else max(0.0, min(lows) - 0.15 * (y1 - min(lows) + 1e-9))
    y1 += 0.08 * (y1 - y0 + 1e-9)

    def py(y: float) -> float:
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    draw.rectangle([left, top, w - right, h - bottom], outline=_INK)
    for t in _nice_ticks(y0, y1):
        draw.line([(left, py(t)), (w - right, py(t))], fill=(225, 225, 225))
        draw.text((4, py(t) - 6), _fmt(t), fill=_INK, font=font)
    slot = (w - left - right) / len(groups)
    bar = min(22.0, 0.8 * slot / per_group)
    for g, (group, bars) in enumerate(groups.items()):
        x_start = left + g * slot + (slot - bar * per_group) / 2
        for i, name in enumerate(names):
            if name not in bars:
                continue
            v, e = bars[name]
            x = x_start + i * bar
            draw.rectangle([x + 1, py(v), x + bar - 1, py(y0)], fill=PALETTE[i % len(PALETTE)])
            if e > 0:
                cx = x + bar / 2
                draw.line([(cx, py(v - e)), (cx, py(v + e))], fill=_INK, width=1)
                draw.line([(cx - 3, py(v + e)), (cx + 3, py(v + e))], fill=_INK)
                draw.line([(cx - 3, py(v - e)), (cx + 3, py(v - e))], fill=_INK)
            draw.text((x, py(v + e) - 12), f"{v:.0f}", fill=_INK, font=font)
        draw.text((left + g * slot + slot / 2 - 3 * len(group), h - bottom + 8), group, fill=_INK, font=font)
    for i, name in enumerate(names):
        ly = top + 8 + 14 * i
        draw.rectangle([w - right + 8, ly + 1, w - right + 20, ly + 11], fill=PALETTE[i % len(PALETTE)])
        draw.text((w - right + 26, ly), name, fill=_INK, font=font)
    draw.text((left, 10), title, fill=_INK, font=font)
    if ylabel:
        draw.text((4, top - 16), ylabel, fill=_INK, font=font)
    return img


# ----------------------------------------------------------------------------- embeddings
def _thumb(img: Image.Image, size: int) -> Image.Image:
    img = img.convert("RGB")
    scale = size / max(img.size)
    resample = Image.NEAREST if scale >= 2 else Image.BICUBIC
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
    panel = Image.new("RGB", (size, size), _BG)
    panel.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return panel


def _short(text: str, chars: int) -> str:
    return text if len(text) <= chars else "..." + text[-(chars - 3):]


def neighbour_grid(queries: Sequence[Image.Image], neighbours: Sequence[Sequence[Image.Image]],
                   query_names: Sequence[str], neighbour_names: Sequence[Sequence[str]],
                   similarities: Sequence[Sequence[float]] | None = None, thumb: int = 96,
                   title: str = "") -> Image.Image:
    """One row per query: the query (framed), then its neighbours, most similar first; the file
    name (and cosine similarity) under every thumbnail."""
    if not queries or len(queries) != len(neighbours):
        raise ValueError("one row of neighbours per query is needed")
    cols = 1 + max(len(r) for r in neighbours)
    pad, label_h, head = 6, 24, 22 if title else 6
    w, h = cols * (thumb + pad) + pad + 8, len(queries) * (thumb + label_h + pad) + pad + head
    out = Image.new("RGB", (w, h), _BG)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    if title:
        draw.text((pad, 5), title, fill=_INK, font=font)
    chars = max(6, thumb // 6)
    for r, (query, row) in enumerate(zip(queries, neighbours)):
        y = head + r * (thumb + label_h + pad)
        cells = [(query, query_names[r], None)] + [
            (img, neighbour_names[r][j], None if similarities is None else similarities[r][j]) for j, img in enumerate(row)]
        for c, (img, name, sim) in enumerate(cells):
            x = pad + c * (thumb + pad) + (8 if c else 0)
            out.paste(_thumb(img, thumb), (x, y))
            if c == 0:
                draw.rectangle([x - 3, y - 3, x + thumb + 2, y + thumb + 2], outline=_TARGET, width=2)
            draw.text((x, y + thumb + 2), _short(name, chars), fill=_INK, font=font)
            if sim is not None:
                draw.text((x, y + thumb + 12), f"{sim:.3f}", fill=(110, 110, 110), font=font)
    return out


def pca_2d(features: torch.Tensor) -> np.ndarray:
    """``[N, 2]`` coordinates of the features on their first two principal components."""
    x = features.float() - features.float().mean(0, keepdim=True)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2))
    _, _, v = torch.pca_lowrank(x, q=min(2, x.shape[1]), center=False)
    coords = (x @ v[:, :2]).numpy()
    return coords if coords.shape[1] == 2 else np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def embedding_map(coords: np.ndarray, labels: Sequence[int] | None = None, classes: Sequence[str] = (),
                  title: str = "", size: int = 560) -> Image.Image:
    """Scatter plot of 2-D coordinates (e.g. :func:`pca_2d`), one colour per class when labels
    exist (legend on the right), grey dots otherwise."""
    coords = np.asarray(coords, dtype=np.float64)
    right = 150 if classes else 20
    img = Image.new("RGB", (size + right, size), _BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    margin, top = 20, 28
    lo, hi = coords.min(0), coords.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    draw.rectangle([margin, top, size - margin, size - margin], outline=_INK)
    colours = [PALETTE[i % len(PALETTE)] if i < len(PALETTE) else
               tuple(int(c) for c in np.array(PALETTE[i % len(PALETTE)]) * 0.55) for i in range(max(1, len(classes)))]
    for k, (x, y) in enumerate(coords):
        px = margin + 4 + (x - lo[0]) / span[0] * (size - 2 * margin - 8)
        py = size - margin - 4 - (y - lo[1]) / span[1] * (size - margin - top - 8)
        label = int(labels[k]) if labels is not None else -1
        colour = colours[label] if 0 <= label < len(colours) and classes else (120, 120, 120)
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    for i, name in enumerate(classes):
        ly = top + 4 + 14 * i
        draw.rectangle([size + 4, ly + 1, size + 14, ly + 11], fill=colours[i])
        draw.text((size + 20, ly), _short(str(name), 20), fill=_INK, font=font)
    draw.text((margin, 8), title, fill=_INK, font=font)
    return img


# ----------------------------------------------------------------------------- run figures
def training_curves(records: Sequence[Mapping]) -> dict[str, Image.Image]:
    """Charts from metrics.jsonl records: ``loss`` (every key with "loss") and ``knn`` (keys with
    "knn"), against the step. Charts with no data are left out."""
    keys = sorted({k for r in records for k in r})
    charts = {}
    loss = curve_series(records, [k for k in keys if "loss" in k])
    if loss:
        charts["loss"] = line_chart(loss, title="pretraining loss", xlabel="step")
    knn = curve_series(records, [k for k in keys if "knn" in k])
    if knn:
        charts["knn"] = line_chart(knn, title="kNN monitor (top-1, validation split)", xlabel="step")
    return charts


def write_run_figures(run_dir: str | Path, num_images: int = 4, which: str | None = None, seed: int = 0,
                      split: str | None = None, device=None, log=print, pca_images: int = 64) -> list[Path]:
    """Write RUN_DIR/figures/{masks,pca,pca_raw,loss,knn}.png; returns the written paths.

    Images: ``num_images`` seeded picks from ``split`` (default ``data.eval_split``); masks from the
    recipe's mask generator (seed ``seed``, step 0); PCA of the ``which`` encoder's patch tokens
    (default: the one the run exports, ``train.export_encoder``),
    fit on ``pca_images`` images: ``pca.png`` with each position's mean removed (content),
    ``pca_raw.png`` without (dominated by the positional embedding).
    """
    from scott.config import load_recipe
    from scott.data.datasets import build_dataset
    from scott.data.transforms import transform_from_spec
    from scott.eval.features import load_encoder
    from scott.masks import build_mask_generator, masks_for_step

    run_dir = Path(run_dir)
    out_dir = run_dir / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    recipe = load_recipe(run_dir / "recipe.yaml", check_data=False)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for name, chart in training_curves(read_metrics(metrics)).items():
            written.append(out_dir / f"{name}.png")
            chart.save(written[-1])
    else:
        log(f"note: {metrics} not found, no curves")

    encoder = load_encoder(run_dir, which=which, device=device)
    spec = encoder.eval_transform_spec
    transform = transform_from_spec(spec)
    dataset = build_dataset(recipe["data"], split or recipe["data"]["eval_split"])
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=gen)[:max(num_images, pca_images)].tolist()
    batch = torch.stack([transform(dataset[i][0]) for i in picks])
    shown = [denormalize(x, spec["mean"], spec["std"]) for x in batch[:num_images]]
    grid = tuple(int(g) for g in encoder.grid_size)
    masks = masks_for_step(build_mask_generator(recipe["mask"], grid), len(shown), seed, 0)
    written.append(out_dir / "masks.png")
    mask_figure(shown, masks.visible, masks.target).save(written[-1])
    with torch.no_grad():
        dev = next(encoder.parameters()).device
        tokens = encoder(batch.to(dev), None, "all").float().cpu()
    written.append(out_dir / "pca.png")
    pca_figure(shown, tokens, grid, center="position").save(written[-1])
    written.append(out_dir / "pca_raw.png")
    pca_figure(shown, tokens, grid, center="global").save(written[-1])
    return written
