"""Seeded, deterministic index subsets of a labelled dataset (pure functions of labels + seed).

* :func:`stratified_subset` - ``n`` images with the class proportions kept (``data.train_subset``,
  the "small data" regimes of ``benchmarks/quality.py``);
* :func:`class_indices` - the images of some classes (``data.classes``, the transfer regime:
  pretrain on some classes, evaluate on the others);
* :func:`labels_per_class` - exactly ``k`` labelled images of every class, drawn from a pool
  (label-efficiency probes with 10 or 100 labels per class).

All return sorted ``int64`` index arrays into ``labels``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["stratified_subset", "class_indices", "labels_per_class"]


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(tag)]))


def stratified_subset(labels, n: int, seed: int) -> np.ndarray:
    """``n`` indices whose class counts are proportional to ``labels`` (largest remainder rounding).

    Raises ``ValueError`` when ``n`` is not in ``[1, len(labels)]``.
    """
    labels = np.asarray(labels)
    if not 1 <= int(n) <= len(labels):
        raise ValueError(f"subset size {n} must be in [1, {len(labels)}] (the split's size)")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (int(n) / len(labels))
    take = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: int(n) - int(take.sum())]] += 1
    rng = _rng(seed, 0x5B5E7)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def class_indices(labels, classes: Sequence[int]) -> np.ndarray:
    """Indices of the images whose label is in ``classes``; ``ValueError`` if none is present."""
    labels = np.asarray(labels)
    wanted = sorted({int(c) for c in classes})
    missing = [c for c in wanted if not np.any(labels == c)]
    if missing:
        present = sorted(int(c) for c in np.unique(labels))
        raise ValueError(f"classes {missing} have no images (present: {present})")
    return np.flatnonzero(np.isin(labels, wanted)).astype(np.int64)


def labels_per_class(labels, per_class: int, seed: int, pool=None) -> np.ndarray:
    """Exactly ``per_class`` indices of every class present in ``labels[pool]``.

    ``pool`` (indices, default all) restricts the draw, e.g. to the fit part of a train/val carve
    so the labelled subset stays disjoint from the validation split. Draw ``d`` of a study is
    ``seed = d``. Raises ``ValueError`` if a class has fewer than ``per_class`` images in the pool.
    """
    labels = np.asarray(labels)
    pool = np.arange(len(labels)) if pool is None else np.asarray(pool, dtype=np.int64)
    if int(per_class) < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = _rng(seed, 0x1ABE1)
    chosen = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        if len(members) < per_class:
            raise ValueError(f"class {int(c)} has {len(members)} images in the pool, fewer than {per_class}")
        chosen.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen)).astype(np.int64)
