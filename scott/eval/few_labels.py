"""Label efficiency: linear probes trained on ``k`` labelled images per class.

The labelled train set is carved once into (fit, val) exactly as every other probe does
(``scott.eval.protocol.carve_validation``). For draw ``d`` the probe's training images are
``labels_per_class(k, seed=d)`` drawn from the FIT part only, so they never overlap the
validation images; the hyper-parameters are chosen on the validation part, the chosen probe is
trained on the ``k``-per-class images alone, and the test split is evaluated once per draw.

Public API:
    few_label_probe(train, test, per_class, draws=3, ...) -> dict (per-draw and mean/std top-1)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from scott.data.subsets import labels_per_class
from scott.eval.linear import LinearProbe, linear_grid
from scott.eval.protocol import FeatureSet, _split_indices, evaluate_classifier, fit_probe, select_hyperparameters

__all__ = ["few_label_probe", "FEW_LABEL_GRID"]

#: Fewer examples need more epochs for the same number of updates: the grid's epochs are larger.
FEW_LABEL_GRID = dict(lrs=(0.01, 0.1, 1.0), epochs=(100, 300), batch_size=64)


def few_label_probe(train: FeatureSet, test: FeatureSet, per_class: int, draws: int = 3,
                    val_fraction: float = 0.1, seed: int = 0, grid: Sequence[dict] | None = None,
                    device=None) -> dict:
    """Linear probe with ``per_class`` labels per class, ``draws`` independent draws.

    Returns ``{"per_class", "draws": [{"seed", "n_train", "best", "val_top1", "test_top1"}],
    "test_top1_mean", "test_top1_std", "n_val", "n_test"}`` (accuracies as fractions).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    fit_idx, val_idx = _split_indices(train.labels, val_fraction, seed)
    val = train.subset(val_idx)
    grid = grid or linear_grid(FEW_LABEL_GRID["lrs"], FEW_LABEL_GRID["epochs"], FEW_LABEL_GRID["batch_size"])
    dim = train.features.shape[1]
    classes = int(train.labels.max()) + 1

    def build(params: dict) -> torch.nn.Module:
        return LinearProbe(dim, classes)

    rows = []
    for d in range(draws):
        idx = labels_per_class(train.labels.numpy(), per_class, seed=d, pool=fit_idx.numpy())
        few = train.subset(torch.as_tensor(idx))
        best, table = select_hyperparameters(few, val, grid, build, seed=seed, device=device)
        val_top1 = max(r["val_top1"] for r in table)
        model = fit_probe(build, few, best, seed, device)
        rows.append({"seed": d, "n_train": len(few), "best": best, "val_top1": val_top1,
                     "test_top1": evaluate_classifier(model, test)["top1"]})  # the one look per draw
    accs = np.array([r["test_top1"] for r in rows])
    return {"per_class": int(per_class), "draws": rows, "test_top1_mean": float(accs.mean()),
            "test_top1_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "n_val": len(val), "n_test": len(test)}
