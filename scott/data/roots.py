"""Where each dataset lives by default, and how Fashion-MNIST IDX files are found.

Kept free of torch imports so that recipe validation (``scott.config``) can check data folders
cheaply.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

__all__ = ["DEMO_DIR", "FASHION_MNIST_FILES", "SPLITS", "default_root", "find_idx_file"]

#: Embedded demo subset shipped inside the package (see tools/make_demo_data.py).
DEMO_DIR = Path(__file__).resolve().parent / "demo"

#: IDX file stems (without ``.gz``) for each Fashion-MNIST split: (images, labels).
FASHION_MNIST_FILES = MappingProxyType(
    {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
)

#: split name -> stored splits it is made of, per dataset (see scott.data.datasets). "val" exists
#: only where the dataset has an official validation split; elsewhere probes carve one from train.
SPLITS = MappingProxyType(
    {
        "demo": {"train": ("train",), "trainval": ("train",), "test": ("test",)},
        "fashion_mnist": {"train": ("train",), "trainval": ("train",), "test": ("test",)},
        "flowers": {"train": ("train",), "val": ("val",), "trainval": ("train", "val"), "test": ("test",)},
        "pets": {"train": ("trainval",), "trainval": ("trainval",), "test": ("test",)},
        "imagenet100": {"train": ("train",), "trainval": ("train",), "test": ("val",)},
        "imagefolder": {"train": ("train",), "val": ("val",), "trainval": ("train",), "test": ("test",)},
        # every image under data.root; no test split: evaluation carves "val" from the labelled images
        "folder": {"train": ("all",), "trainval": ("all",)},
    }
)

_DEFAULT_ROOTS = MappingProxyType(
    {
        "demo": DEMO_DIR,
        # Debian package dataset-fashion-mnist
        "fashion_mnist": Path("/usr/share/datasets/fashion-mnist"),
        # torchvision download folders, relative to the working directory
        "flowers": Path("data/flowers"),
        "pets": Path("data/pets"),
        "imagenet100": Path("data/imagenet100"),
    }
)


def default_root(name: str) -> Path:
    """Default ``data.root`` of dataset ``name`` (``imagefolder`` has none: root is required)."""
    if name not in _DEFAULT_ROOTS:
        raise ValueError(f"dataset '{name}' has no default root; set data.root")
    return _DEFAULT_ROOTS[name]


def find_idx_file(root, stem: str) -> Path | None:
    """Path of IDX file ``stem`` (``.gz`` or raw) in ``root`` or torchvision's ``FashionMNIST/raw``."""
    root = Path(root)
    for folder in (root, root / "FashionMNIST" / "raw"):
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    return None
