"""Map-style image datasets: ``build_dataset(data_cfg, split)`` -> items ``(PIL image, int label)``.

Datasets (``data.name``) and their splits:

==============  =====================================================================
demo            embedded Fashion-MNIST subset (scott/data/demo): train 5,000 / test 1,000
fashion_mnist   IDX files in ``data.root`` (default: Debian dataset-fashion-mnist),
                train 60,000 / test 10,000; torchvision download if ``data.download``
flowers         torchvision Flowers102, official train / val / test (1,020 / 1,020 / 6,149)
pets            torchvision OxfordIIITPet, official trainval / test (3,680 / 3,669);
                "train" is an alias of "trainval"
imagenet100     folder ``root/train`` and ``root/val``; "test" reads ``root/val`` (ImageNet's
                held-out set), there is no separate "val" split
imagefolder     folders ``root/<split>/<class>/<image>`` for train, val, test
==============  =====================================================================

"trainval" is every labelled non-test image (flowers: train + val; others: train).
Where a dataset has no official validation split, probes carve one from train with
:func:`split_train_val` (stratified, deterministic) -- never from test.

Every dataset has ``labels`` (int64 numpy array), ``classes`` (list of names) and an optional
``transform`` applied to the image. ``in_chans`` converts grey images to RGB (3) or colour
images to grey (1); ``None`` keeps each image's natural mode (grey for Fashion-MNIST).

Bad images (``data.on_bad_image``): ``error`` raises :class:`BadImageError` naming the file the
first time it is read (also from a DataLoader worker: still one line); ``skip`` decodes every
file in full when the dataset is built, drops unreadable ones, logs each skipped path once and
the count, and (for a file that breaks after the scan) logs and replaces the item by the next
readable one at read time.

Every :class:`DatasetError` is a :class:`scott.config.RecipeError` whose one-line message names
the file or the recipe key (``data.root``, ``data.download``, ``optim.batch_size``) and what to
do; the CLIs print it and exit with status 2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from scott.config import RecipeError
from scott.data.idx import IdxError, read_idx
from scott.data.images import DEFAULT_MAX_PIXELS, convert_mode, open_image
from scott.data.roots import FASHION_MNIST_FILES, SPLITS, default_root, find_idx_file

__all__ = [
    "DatasetError",
    "BadImageError",
    "LabeledDataset",
    "ArrayImageDataset",
    "ImageFileDataset",
    "LabeledConcat",
    "LabeledSubset",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "available_splits",
    "build_dataset",
    "build_pretrain_dataset",
    "check_dataset_size",
    "has_labels",
    "folder_dataset",
    "convert_channels",
    "pretrain_split",
    "scan_image_folder",
    "split_train_val",
]

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")

#: split name -> stored splits it is made of, per dataset.
_SPLITS = SPLITS

#: Splits used for self-supervised pretraining (all labelled non-test images).
_PRETRAIN_SPLITS = {
    "demo": ("train",),
    "fashion_mnist": ("train",),
    "flowers": ("train", "val"),  # official train + val: every non-test image
    "pets": ("trainval",),
    "imagenet100": ("train",),
    "imagefolder": ("train",),
    "folder": ("train",),  # every image under data.root
}


class DatasetError(RecipeError, RuntimeError):
    """A dataset cannot be built or used; the one-line message names the file or recipe key and
    what to do.

    A :class:`scott.config.RecipeError`, so every CLI reports it the same way (``run_cli``: one
    line on stderr, exit 2). Raised inside a DataLoader worker, PyTorch re-creates it in the main
    process from a message holding the worker's traceback; the constructor keeps only the
    original message, so the user still sees one line.
    """

    def __init__(self, message: str = ""):
        super().__init__(_worker_message(str(message), type(self).__name__))


def _worker_message(message: str, cls_name: str) -> str:
    """The original message of an exception re-raised from a DataLoader worker (else ``message``)."""
    if "Original Traceback" not in message:
        return message
    lines = [line for line in message.splitlines() if line.strip()]
    worker = message.split(" in DataLoader worker process ", 1)[1].split(".", 1)[0] if (
        " in DataLoader worker process " in message) else "?"
    last = lines[-1].strip()
    for prefix in (f"scott.data.datasets.{cls_name}: ", f"{cls_name}: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
            break
    return f"{last} (in data loader worker {worker})"


class BadImageError(DatasetError):
    """An image file cannot be read; the message names its path."""


# ---------------------------------------------------------------------------------------------
# Dataset classes
# ---------------------------------------------------------------------------------------------


def convert_channels(img: Image.Image, in_chans: int | None) -> Image.Image:
    """Return ``img`` as "L" (in_chans 1) or "RGB" (in_chans 3); None: grey stays "L", else "RGB".

    The one conversion rule of :func:`scott.data.images.convert_mode` (transparency on white,
    high bit depth scaled by the format's range), also used for every image file.
    """
    return convert_mode(img, in_chans)


class LabeledDataset:
    """Base: ``labels`` (int64 array), ``classes``, ``transform``; items (image, int label)."""

    labels: np.ndarray
    classes: list
    transform: Callable | None = None
    description: str = "dataset"

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.description} of {len(self)} images")
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}: {len(self)} images, {self.num_classes} classes>"


class ArrayImageDataset(LabeledDataset):
    """Images held in a uint8 array [N, H, W] (grey) or [N, H, W, 3] (RGB)."""

    def __init__(self, images: np.ndarray, labels, classes: Sequence[str], in_chans: int | None = None,
                 transform: Callable | None = None, description: str = "array dataset"):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DatasetError(f"{description}: images must be uint8 [N,H,W] or [N,H,W,3], got {images.dtype} {images.shape}")
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(images):
            raise DatasetError(f"{description}: {len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.classes = images, labels, list(classes)
        self.in_chans, self.transform, self.description = in_chans, transform, description

    def load_image(self, index: int) -> Image.Image:
        array = self.images[index]
        img = Image.fromarray(np.ascontiguousarray(array))  # uint8 [H,W] -> "L", [H,W,3] -> "RGB"
        return convert_channels(img, self.in_chans)


class ImageFileDataset(LabeledDataset):
    """Images read lazily from files, with the bad-image policy ``on_bad_image`` (error|skip).

    Files are decoded by :func:`scott.data.images.open_image`; ``max_image_pixels``
    (``data.max_image_pixels``, None: no limit) is the largest width x height accepted, checked
    from the file's header before decoding.
    """

    def __init__(self, paths: Sequence, labels, classes: Sequence[str], in_chans: int | None = None,
                 on_bad_image: str = "error", transform: Callable | None = None,
                 description: str = "image files", max_image_pixels: int | None = DEFAULT_MAX_PIXELS):
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        paths = [Path(p) for p in paths]
        labels = np.asarray(labels, dtype=np.int64)
        if len(paths) != len(labels):
            raise DatasetError(f"{description}: {len(paths)} files but {len(labels)} labels")
        self.classes, self.in_chans, self.on_bad_image = list(classes), in_chans, on_bad_image
        self.transform, self.description = transform, description
        self.max_image_pixels = max_image_pixels
        if on_bad_image == "skip":
            keep = _readable(paths, description, in_chans, max_image_pixels)
            paths = [p for p, k in zip(paths, keep) if k]
            labels = labels[np.asarray(keep, dtype=bool)] if len(labels) else labels
        self.paths, self.labels = paths, labels

    def _open(self, path: Path) -> Image.Image:
        try:
            return open_image(path, self.in_chans, self.max_image_pixels)
        except BadImageError as exc:
            if self.on_bad_image != "error":
                raise
            too_large = getattr(exc, "too_large", False)
            hint = ", or set data.on_bad_image: skip" if too_large else (
                "; replace or delete the file, or set data.on_bad_image: skip")
            raise BadImageError(f"{exc}{hint}") from None

    def load_image(self, index: int) -> Image.Image:
        if self.on_bad_image == "error":
            return self._open(self.paths[index])
        for step in range(len(self.paths)):
            path = self.paths[(index + step) % len(self.paths)]
            try:
                return self._open(path)
            except BadImageError as exc:
                log.warning("%s: skipping unreadable image %s", self.description, exc)
        raise BadImageError(f"{self.description}: no readable image left")


def _readable(paths: Sequence[Path], description: str, in_chans: int | None = None,
              max_image_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[bool]:
    """Decode every file in full with :func:`scott.data.images.open_image` (as it is read later:
    ``load``, not ``verify``, a truncated JPEG passes ``verify``; files over the size limit fail).

    Logs each unreadable file once per process (a second scan of the same unchanged file, e.g.
    the kNN report after pretraining, does not repeat it) and, at the end of every scan that
    skipped files, the total.
    """
    keep = []
    for path in paths:
        key = _scan_key(path)
        key = key and key + (in_chans, max_image_pixels)  # the answer depends on the limit
        ok = _SCANNED.get(key) if key is not None else False
        if ok is None:
            try:
                open_image(path, in_chans, max_image_pixels)
                ok = True
            except BadImageError as exc:  # open_image turns every decoding failure into one
                log.warning("%s: skipping unreadable image %s", description, exc)
                ok = False
            _SCANNED[key] = ok
        elif key is None:
            log.warning("%s: skipping unreadable image %s (cannot stat the file)", description, path)
        keep.append(ok)
    skipped = keep.count(False)
    if skipped:
        log.warning("%s: skipped %d of %d images (data.on_bad_image: skip)", description, skipped, len(paths))
    return keep


#: (path, size, mtime, in_chans, max_image_pixels) -> decodes; results of earlier scans in this process.
_SCANNED: dict[tuple, bool] = {}


def _scan_key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


class LabeledConcat(LabeledDataset):
    """Concatenation of labelled datasets that share their class list."""

    def __init__(self, parts: Sequence[LabeledDataset], transform: Callable | None = None,
                 description: str | None = None):
        if not parts:
            raise DatasetError("nothing to concatenate")
        self.parts = list(parts)
        self.classes = list(parts[0].classes)
        self.labels = np.concatenate([p.labels for p in parts]).astype(np.int64)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.transform = transform
        self.description = description or " + ".join(p.description for p in parts)

    def load_image(self, index: int) -> Image.Image:
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.parts[part].load_image(index - int(self.offsets[part]))


class LabeledSubset(LabeledDataset):
    """The items of ``base`` at ``indices`` (e.g. a train/val carve-out)."""

    def __init__(self, base: LabeledDataset, indices, transform: Callable | None = None,
                 description: str | None = None):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.labels, self.classes = base.labels[self.indices], list(base.classes)
        self.transform = transform
        self.description = description or f"subset of {base.description}"

    def load_image(self, index: int) -> Image.Image:
        return self.base.load_image(int(self.indices[index]))


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def available_splits(data_cfg: dict) -> tuple[str, ...]:
    """Split names ``build_dataset`` accepts for this dataset."""
    return tuple(_SPLITS[data_cfg["name"]])


def _data_section(data_cfg):
    """The typed ``data`` section (a mapping is completed from the schema, one-line errors)."""
    from scott.config import as_section

    return as_section("data", data_cfg)


def pretrain_split(data_cfg: dict) -> tuple[str, ...]:
    """Splits whose images are used for self-supervised pretraining.

    Training images only (flowers: official train + val, pets: trainval). With
    ``data.transductive: true`` the test images are added as well, with a loud warning: the
    model then sees (unlabelled) test images, as the official SCOTT code does.
    """
    data_cfg = _data_section(data_cfg)
    splits = _PRETRAIN_SPLITS[data_cfg["name"]]
    if data_cfg["transductive"] and "test" in _SPLITS[data_cfg["name"]]:  # a folder has no test split
        log.warning(
            "TRANSDUCTIVE pretraining: data.transductive is true, the %s TEST images are used "
            "(without labels) for self-supervised pretraining; results are not comparable to "
            "inductive ones", data_cfg["name"],
        )
        splits = splits + ("test",)
    return splits


def build_dataset(data_cfg: dict, split: str, transform: Callable | None = None,
                  in_chans: int | None = None) -> LabeledDataset:
    """The ``split`` of dataset ``data_cfg["name"]`` (the recipe's ``data`` section).

    Items are ``(PIL image, int label)`` (or ``(transform(image), label)``). ``in_chans``
    (1 or 3) converts image channels; None keeps them.
    """
    data_cfg = _data_section(data_cfg)
    name = data_cfg["name"]
    if name not in _SPLITS:
        raise DatasetError(f"unknown dataset '{name}'")
    if split not in _SPLITS[name]:
        hint = ("; probes carve a validation split from train with split_train_val"
                if split == "val" else "")
        raise DatasetError(f"{name}: no split '{split}' (splits: {', '.join(_SPLITS[name])}){hint}")
    root = Path(data_cfg["root"]).expanduser() if data_cfg["root"] else None
    parts = [_load_stored(name, root, stored, data_cfg, in_chans) for stored in _SPLITS[name][split]]
    dataset = parts[0] if len(parts) == 1 else LabeledConcat(parts, description=f"{name} {split}")
    dataset = _restrict(dataset, data_cfg, split)
    dataset.transform = transform
    return dataset


def _restrict(dataset: LabeledDataset, data_cfg: dict, split: str) -> LabeledDataset:
    """Apply ``data.classes`` (every split) and ``data.train_subset`` (every split but test)."""
    from .subsets import class_indices, stratified_subset

    classes, subset = data_cfg["classes"], data_cfg["train_subset"]
    index = np.arange(len(dataset))
    try:
        if classes:
            index = class_indices(dataset.labels, classes)
        if subset and split != "test":
            index = index[stratified_subset(dataset.labels[index], min(int(subset), len(index)),
                                            data_cfg["subset_seed"])]
    except ValueError as exc:
        raise DatasetError(f"data.classes / data.train_subset on {dataset.description}: {exc}") from None
    if len(index) == len(dataset):
        return dataset
    what = [f"classes {sorted(classes)}"] if classes else []
    what += [f"{len(index)} images (data.train_subset, seed {data_cfg['subset_seed']})"] if subset and split != "test" else []
    return LabeledSubset(dataset, index, description=f"{dataset.description}, {', '.join(what)}")


def build_pretrain_dataset(data_cfg: dict, transform: Callable | None = None,
                           in_chans: int | None = None) -> LabeledDataset:
    """All images of :func:`pretrain_split` in one dataset (labels kept, unused by pretraining)."""
    data_cfg = _data_section(data_cfg)
    splits = pretrain_split(data_cfg)
    parts = [build_dataset(data_cfg, s, in_chans=in_chans) for s in splits]
    dataset = parts[0] if len(parts) == 1 else LabeledConcat(parts, description=f"{data_cfg['name']} {'+'.join(splits)}")
    dataset.transform = transform
    return dataset


def _load_stored(name: str, root: Path | None, stored: str, data_cfg: dict, in_chans) -> LabeledDataset:
    policy = data_cfg["on_bad_image"]
    download = data_cfg["download"]
    if name in ("demo", "fashion_mnist"):
        return _fashion_mnist(name, root or default_root(name), stored, download and name != "demo", in_chans)
    if name in ("imagefolder", "imagenet100"):
        if root is None:
            if name == "imagefolder":
                raise DatasetError("imagefolder: data.root is required")
            root = default_root(name)
        try:
            paths, labels, classes = scan_image_folder(root / stored)
        except DatasetError as exc:
            raise DatasetError(f"data.root: {exc}") from None
        return ImageFileDataset(paths, labels, classes, in_chans, policy, description=f"{name} {stored} ({root / stored})",
                                max_image_pixels=data_cfg["max_image_pixels"])
    if name == "folder":
        return _folder_dataset(root, data_cfg, in_chans)
    if name == "flowers":
        return _torchvision_files("Flowers102", root or default_root(name), stored, download, in_chans, policy,
                                  data_cfg["max_image_pixels"])
    if name == "pets":
        return _torchvision_files("OxfordIIITPet", root or default_root(name), stored, download, in_chans, policy,
                                  data_cfg["max_image_pixels"])
    raise DatasetError(f"unknown dataset '{name}'")  # pragma: no cover


def _folder_dataset(root: Path | None, data_cfg, in_chans) -> ImageFileDataset:
    """The recipe's folder (``data.root``); errors name the key."""
    if root is None:
        raise DatasetError("data.root: required for data.name 'folder' (the folder holding your images)")
    try:
        return folder_dataset(root, in_chans, data_cfg["on_bad_image"], data_cfg["max_image_pixels"],
                              data_cfg["class_folders"])
    except DatasetError as exc:
        raise DatasetError(f"data.root: {exc}") from None


def folder_dataset(root, in_chans: int | None = None, on_bad_image: str = "error",
                   max_image_pixels: int | None = DEFAULT_MAX_PIXELS, class_folders: bool = True) -> ImageFileDataset:
    """Every image under ``root`` (``scott.data.folder`` rules; labels only from class folders).
    A missing folder or one without images is a one-line ``DatasetError``."""
    from .folder import scan_folder

    try:
        scan = scan_folder(root, IMAGE_EXTENSIONS, class_folders=class_folders)
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(str(exc)) from None
    if scan.labelled:
        shown = ", ".join(scan.classes[:6]) + (", ..." if len(scan.classes) > 6 else "")
        kind = f"labels from {len(scan.classes)} class folders: {shown}; data.class_folders: false if they are not classes"
    else:
        kind = "unlabelled"
    return ImageFileDataset(scan.paths, scan.labels, scan.classes, in_chans, on_bad_image,
                            description=f"folder {scan.root} ({kind})", max_image_pixels=max_image_pixels)


def has_labels(dataset) -> bool:
    """Whether every image of ``dataset`` has a class label (kNN and probes need them)."""
    from .folder import UNLABELLED

    return len(dataset.labels) > 0 and bool((np.asarray(dataset.labels) != UNLABELLED).all())


def _fashion_mnist(name: str, root: Path, stored: str, download: bool, in_chans) -> ArrayImageDataset:
    stems = FASHION_MNIST_FILES[stored]
    paths = [find_idx_file(root, s) for s in stems]
    if None in paths and download:
        import torchvision

        try:
            torchvision.datasets.FashionMNIST(str(root), train=(stored == "train"), download=True)
        except Exception as exc:  # network errors come in many types
            raise DatasetError(
                f"data.download: download of Fashion-MNIST into {root} failed ({_one_line(exc)}); without "
                "network install the Debian package dataset-fashion-mnist or set data.root to a folder "
                "holding the IDX files") from None
        paths = [find_idx_file(root, s) for s in stems]
    if None in paths:
        missing = [s for s, p in zip(stems, paths) if p is None]
        where = f"data folder '{root}' does not exist" if not root.is_dir() else f"'{root}' lacks IDX files {', '.join(missing)}"
        hint = ("remove data.root to use the embedded demo subset, or point it at a folder with the Fashion-MNIST "
                "IDX files" if name == "demo" else "set data.root to a folder with the IDX files, install the "
                "Debian package dataset-fashion-mnist, or set data.download: true")
        raise DatasetError(f"data.root: {where} ({name}); {hint}")
    try:
        images, labels = read_idx(paths[0]), read_idx(paths[1])
    except IdxError as exc:
        raise DatasetError(f"data.root: {exc}; replace the damaged file") from None
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"data.root: {paths[0]} / {paths[1]} shapes {images.shape} / {labels.shape} do not match; "
                           "replace the damaged files")
    return ArrayImageDataset(images, labels, FASHION_MNIST_CLASSES, in_chans, description=f"{name} {stored}")


def _one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line (network errors can span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _torchvision_files(cls_name: str, root: Path, stored: str, download: bool, in_chans, policy,
                       max_image_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageFileDataset:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    try:
        tv = cls(str(root), split=stored, download=download)
    except ImportError as exc:
        raise DatasetError(f"{cls_name}: needs an extra package ({exc}); for Flowers102 install scipy") from None
    except Exception as exc:  # missing files / failed download
        if download:
            raise DatasetError(
                f"data.download: {cls_name} {stored}: download into {root} failed ({_one_line(exc)}); without "
                "network, copy the dataset there or set data.root to a folder holding it") from None
        raise DatasetError(
            f"data.root: {cls_name} {stored}: cannot load from {root} ({_one_line(exc)}); set data.root to the "
            "folder holding the data or data.download: true"
        ) from None
    paths = getattr(tv, "_image_files", None) or getattr(tv, "_images", None)
    labels = getattr(tv, "_labels", None)
    if paths is None or labels is None:  # pragma: no cover - torchvision internals changed
        raise DatasetError(f"{cls_name}: unsupported torchvision version (no file list)")
    classes = list(getattr(tv, "classes", [])) or [str(c) for c in range(int(max(labels)) + 1)]
    return ImageFileDataset(paths, labels, classes, in_chans, policy, description=f"{cls_name} {stored} ({root})",
                            max_image_pixels=max_image_pixels)


def scan_image_folder(folder) -> tuple[list[Path], np.ndarray, list[str]]:
    """(paths, labels, classes) of ``folder/<class>/<image>``; classes sorted by name.

    Raises DatasetError when the folder is missing, has no class folders, or a class folder
    holds no image (naming it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder does not exist")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(
            p for p in (folder / cls).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not files:
            raise DatasetError(f"{folder / cls}: class folder '{cls}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, np.asarray(labels, dtype=np.int64), classes


# ---------------------------------------------------------------------------------------------
# Checks and splits
# ---------------------------------------------------------------------------------------------


def check_dataset_size(dataset, batch_size: int, what: str | None = None) -> None:
    """Raise DatasetError when ``dataset`` is empty or smaller than one batch of ``batch_size``."""
    what = what or getattr(dataset, "description", "dataset")
    n = len(dataset)
    if n == 0:
        raise DatasetError(f"{what}: dataset is empty; check data.root")
    if n < batch_size:
        raise DatasetError(
            f"{what}: {n} images is fewer than one batch of {batch_size}; lower optim.batch_size "
            "or use more data"
        )


def split_train_val(labels, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic split of indices ``0..len(labels)-1`` into (train, val).

    Each class puts ``round(n_c * val_fraction)`` of its images in val (at least 1 and at most
    n_c - 1 when it has 2 or more). Both index arrays are sorted and disjoint.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_val = int(round(len(members) * val_fraction))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        else:
            n_val = 0
        val.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask).astype(np.int64), val_idx.astype(np.int64)
