"""Embeddings of a folder of images, nearest neighbours among them, and files to keep them.

``embed_folder`` runs an encoder over every image under a folder (``scott.data.folder`` rules)
with the same evaluation transform and pooling as the kNN evaluation; ``nearest_neighbours``
finds, by cosine similarity, each query's closest other images; ``write_embeddings`` stores the
vectors with their relative paths as ``.safetensors`` and ``.npy`` + ``.csv`` (and ``.parquet``
when pyarrow is installed).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scott.data.images import DEFAULT_MAX_PIXELS

__all__ = ["Embeddings", "embed_folder", "nearest_neighbours", "write_embeddings", "read_embeddings"]


@dataclass
class Embeddings:
    """``features [N, F]`` float32, ``paths`` relative to ``root`` (POSIX), ``labels`` (-1 when
    the folder has no class folders) and ``classes``."""

    features: torch.Tensor
    paths: list[str]
    labels: torch.Tensor
    classes: list[str]
    root: str
    pool: str


def embed_folder(encoder, folder, pool: str | None = None, batch_size: int = 64, device=None,
                 num_workers: int = 0, on_bad_image: str = "error", max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
                 progress: bool = True) -> Embeddings:
    """Features of every image under ``folder`` (``pool=None``: the encoder's ``global_pool``),
    read by :func:`scott.data.datasets.folder_dataset` (``max_image_pixels``: the decoder's size
    limit, ``None`` = none).

    Raises ``scott.data.datasets.DatasetError`` (one line, naming the folder or file) for a
    missing or empty folder or an unreadable image under ``on_bad_image="error"``.
    """
    from scott.data.datasets import folder_dataset
    from scott.eval.features import encoder_in_chans, extract_features

    dataset = folder_dataset(folder, encoder_in_chans(encoder), on_bad_image, max_image_pixels)
    root = Path(folder).expanduser()
    pool = pool or getattr(encoder, "global_pool", "avg")
    feats, labels = extract_features(encoder, dataset, pool=pool, batch_size=batch_size, device=device,
                                     num_workers=num_workers, progress=progress, description=f"embed ({pool})")
    return Embeddings(feats.float(), [p.relative_to(root).as_posix() for p in dataset.paths], labels,
                      list(dataset.classes), str(root), pool)


def nearest_neighbours(features: torch.Tensor, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [Q, k], cosine similarities [Q, k])`` of the ``k`` images most similar to each
    query index (the query itself excluded), most similar first."""
    queries = torch.as_tensor(list(queries), dtype=torch.long)
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} images, got {k}")
    x = F.normalize(features.float(), dim=1)
    sims = x[queries] @ x.T
    sims[torch.arange(len(queries)), queries] = -float("inf")  # never your own neighbour
    top, idx = sims.topk(k, dim=1)
    return idx, top


def _base(out: str | Path) -> Path:
    out = Path(out)
    return out.with_suffix("") if out.suffix in (".safetensors", ".npy", ".csv", ".parquet") else out


def write_embeddings(emb: Embeddings, out: str | Path) -> list[Path]:
    """Write ``OUT.safetensors`` (features, labels; paths and classes in its metadata),
    ``OUT.npy`` (features), ``OUT.csv`` (row, path, label, class) and, with pyarrow,
    ``OUT.parquet`` (path, label, feature list). ``out`` may carry one of those suffixes.
    Returns the files written."""
    import json

    from safetensors.torch import save_file

    base = _base(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "scott.embeddings/1", "paths": json.dumps(emb.paths), "classes": json.dumps(emb.classes),
            "root": emb.root, "pool": emb.pool}
    files = [base.with_suffix(".safetensors"), base.with_suffix(".npy"), base.with_suffix(".csv")]
    save_file({"features": emb.features.contiguous(), "labels": emb.labels.long().contiguous()}, str(files[0]),
              metadata=meta)
    np.save(files[1], emb.features.numpy())
    with open(files[2], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "path", "label", "class"])
        for i, (path, label) in enumerate(zip(emb.paths, emb.labels.tolist())):
            writer.writerow([i, path, label, emb.classes[label] if label >= 0 else ""])
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return files
    table = pa.table({"path": emb.paths, "label": emb.labels.tolist(),
                      "features": [row.tolist() for row in emb.features]})
    pq.write_table(table, base.with_suffix(".parquet"))
    return files + [base.with_suffix(".parquet")]


def read_embeddings(path: str | Path) -> Embeddings:
    """The embeddings written by :func:`write_embeddings` (from ``OUT.safetensors``)."""
    import json

    from safetensors import safe_open

    path = _base(path).with_suffix(".safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "scott.embeddings/1":
            raise ValueError(f"{path}: not a scott embeddings file")
        return Embeddings(f.get_tensor("features"), json.loads(meta["paths"]), f.get_tensor("labels"),
                          json.loads(meta["classes"]), meta["root"], meta["pool"])
