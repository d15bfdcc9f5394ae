"""Your own images: every image file under a folder, at any depth, labels only if the folder
says so (``data.name: folder``).

Rules of :func:`scan_folder`:

* an image is a file whose extension is one of ``IMAGE_EXTENSIONS`` (any case); hidden files
  and hidden folders (name starting with ``.``) are ignored, as is everything else;
* symbolic links are followed, each real folder once (a link back up the tree is not a loop);
* the order is the sorted relative path (``a/b.png`` before ``a/c/d.png``), so a run sees the
  same images in the same order on every machine;
* labels exist only when the folder is ``root/<class>/...`` with at least two class folders and
  no image directly in ``root``: the class is the first folder of the relative path, classes are
  sorted by name. Otherwise, or with ``data.class_folders: false`` (first-level folders that are
  not classes, e.g. dates or batches), every label is ``UNLABELLED`` (-1): pretraining needs
  none, and kNN / probes say they need labels. The dataset's description names the classes it
  found, and a run prints it, so a misread layout is visible at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FolderScan", "scan_folder", "UNLABELLED"]

UNLABELLED = -1


@dataclass(frozen=True)
class FolderScan:
    """The images found under ``root``: absolute ``paths``, ``relative`` POSIX paths, ``labels``
    (int64, ``UNLABELLED`` where there are none) and ``classes`` (empty when unlabelled)."""

    root: Path
    paths: list[Path]
    relative: list[str]
    labels: np.ndarray
    classes: list[str]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def _walk_once(root: Path):
    """Relative POSIX paths of the non-hidden files under ``root``; symlinks followed, each real
    folder visited once."""
    seen: set[str] = set()
    found: list[str] = []
    for current, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = Path(current).relative_to(root)
        for name in files:
            if not name.startswith("."):
                found.append((rel_dir / name).as_posix())
    return found


def scan_folder(root: str | Path, extensions, class_folders: bool = True) -> FolderScan:
    """The images under ``root`` by the module's rules (``class_folders=False``: never labels).
    Raises ``FileNotFoundError`` when ``root`` is not a folder and ``ValueError`` when it holds no
    image (the dataset builder turns both into one-line ``DatasetError`` messages naming
    ``data.root``)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"folder '{root}' does not exist")
    exts = {e.lower() for e in extensions}
    relative = sorted(p for p in _walk_once(root) if os.path.splitext(p)[1].lower() in exts)
    if not relative:
        raise ValueError(f"no images under '{root}' (looked for {', '.join(sorted(exts))} at any depth; "
                         "hidden files and folders are ignored)")
    first = [p.split("/", 1)[0] if "/" in p else None for p in relative]
    classes = sorted({f for f in first if f is not None})
    if not class_folders or None in first or len(classes) < 2:
        labels = np.full(len(relative), UNLABELLED, dtype=np.int64)
        classes = []
    else:
        index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([index[f] for f in first], dtype=np.int64)
    return FolderScan(root, [root / p for p in relative], relative, labels, classes)


LAYOUTS = ("nested", "classes")


def _folder_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text)).strip("_")
    return keep or "class"


def write_images(dataset, out: str | Path, layout: str = "nested", limit: int | None = None) -> list[Path]:
    """Write the images of a labelled ``dataset`` as PNG files under ``out``; returns their paths.

    ``nested``: no labels, two folder levels (``part_03/group_2/00342.png``), what an unlabelled
    collection often looks like; ``classes``: ``out/<class name>/00342.png`` (names made safe
    for file systems). The file name is the dataset index, so a file maps back to its item.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out)
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    written = []
    for i in range(n):
        image, label = dataset[i]
        if layout == "classes":
            folder = out / _folder_name(dataset.classes[int(label)])
        else:
            folder = out / f"part_{i // 1000:02d}" / f"group_{(i // 100) % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.png"
        image.save(path)
        written.append(path)
    return written
