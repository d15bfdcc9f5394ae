"""Build the embedded demo data set: a small, class-balanced, real Fashion-MNIST subset.

Used by ``tools/make_demo_data.py``; the result lives in ``scott/data/demo/`` as gzip IDX files
with the Fashion-MNIST names, so the same reader loads the demo and the full data set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scott.data.idx import read_idx, write_idx
from scott.data.roots import FASHION_MNIST_FILES, find_idx_file

__all__ = ["balanced_indices", "make_demo_subset"]

_NOTE = """\
Embedded demo data for scott
============================

A class-balanced subset of Fashion-MNIST (Zalando Research), 28x28 grey images, 10 classes:
{n_train} training images ({per_train} per class) and {n_test} test images ({per_test} per
class), drawn with numpy seed {seed} from the official train and test files by
tools/make_demo_data.py (indices kept in their original order).

Files use the Fashion-MNIST IDX names (gzip): train-images-idx3-ubyte.gz,
train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz.

Classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker,
8 Bag, 9 Ankle boot.

Source: https://github.com/zalandoresearch/fashion-mnist (Debian package dataset-fashion-mnist).
License: MIT, see LICENSE in this folder.
"""

_LICENSE = """\
The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def balanced_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` indices of every class drawn without replacement, returned sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        pool = np.flatnonzero(labels == cls)
        if len(pool) < per_class:
            raise ValueError(f"class {cls} has {len(pool)} images, fewer than {per_class}")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def make_demo_subset(src_root, out_dir, n_train: int = 5000, n_test: int = 1000, seed: int = 0) -> dict:
    """Write the demo subset of the Fashion-MNIST IDX files in ``src_root`` to ``out_dir``.

    Returns a dict split -> number of images written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images_stem, labels_stem = FASHION_MNIST_FILES[split]
        paths = [find_idx_file(src_root, stem) for stem in (images_stem, labels_stem)]
        if None in paths:
            raise FileNotFoundError(f"{src_root}: Fashion-MNIST {split} IDX files not found")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        num_classes = len(np.unique(labels))
        if n % num_classes:
            raise ValueError(f"{split}: {n} images cannot be split evenly over {num_classes} classes")
        idx = balanced_indices(labels, n // num_classes, seed + (0 if split == "train" else 1))
        write_idx(out_dir / f"{images_stem}.gz", images[idx])
        write_idx(out_dir / f"{labels_stem}.gz", labels[idx])
        counts[split] = len(idx)
    (out_dir / "README.md").write_text(
        _NOTE.format(
            n_train=n_train, n_test=n_test, per_train=n_train // 10, per_test=n_test // 10, seed=seed
        )
    )
    (out_dir / "LICENSE").write_text(_LICENSE)
    return counts
