"""Linear probe on frozen features (MAE protocol): BatchNorm1d(affine=False) + Linear.

Learning rate and epochs are chosen on a validation split carved from the labelled TRAIN split;
the chosen setting is retrained and the test split evaluated once (see ``scott.eval.protocol``).

Public API:
    LinearProbe(dim, num_classes)
    linear_grid(lrs, epochs, batch_size, weight_decay)  -> list of settings
    linear_probe(train, test, num_classes, ...)         -> ProbeResult
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from scott.eval.protocol import FeatureSet, ProbeResult, make_grid, run_probe_protocol

__all__ = ["LinearProbe", "linear_grid", "linear_probe", "DEFAULT_LRS", "DEFAULT_EPOCHS"]

DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
DEFAULT_EPOCHS = (20, 50, 100)


class LinearProbe(nn.Module):
    """Parameter-free feature standardisation followed by one linear layer."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(features))


def linear_grid(
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: Sequence[int] = DEFAULT_EPOCHS,
    batch_size: int = 256,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Every (lr, epochs) pair, SGD with momentum, fixed batch size and weight decay."""
    return make_grid(lr=list(lrs), epochs=list(epochs), batch_size=[batch_size], weight_decay=[weight_decay],
                     optimizer=["sgd"])


def linear_probe(
    train: FeatureSet,
    test: FeatureSet,
    num_classes: int | None = None,
    grid: Sequence[dict] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    refit: str = "train+val",
    device=None,
    on_result=None,
) -> ProbeResult:
    """Linear probe with validation-split selection; ``train``/``test`` hold pooled features [N, D]."""
    if train.features.ndim != 2:
        raise ValueError(f"linear probe expects pooled features [N, D], got {tuple(train.features.shape)}")
    dim = train.features.shape[1]
    classes = num_classes or int(train.labels.max()) + 1

    def build(params: dict) -> nn.Module:
        return LinearProbe(dim, classes)

    return run_probe_protocol(
        train, test, grid or linear_grid(), build, val_fraction=val_fraction, seed=seed, refit=refit,
        device=device, on_result=on_result,
    )
