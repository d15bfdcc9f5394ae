"""Probe protocol shared by the linear and attentive probes: select on val, test once.

The labelled TRAIN split is cut into a fit part and a validation part
(``scott.data.datasets.split_train_val``); hyper-parameters are chosen by validation accuracy
(:func:`select_hyperparameters`, which only ever receives the fit and validation sets); the
chosen setting is retrained on the fit part (or fit + validation) and the test split is
evaluated exactly once (:func:`run_probe_protocol`).

Public API:
    FeatureSet(features, labels)                       a labelled tensor set (any feature shape)
    carve_validation(train, val_fraction, seed)        -> (fit, val)
    train_classifier(model, data, epochs, lr, ...)     mini-batch training with a cosine lr
    evaluate_classifier(model, data, num_classes)      -> {"top1", "top5", "mean_per_class"}
    select_hyperparameters(fit, val, grid, build, ...) -> (best_params, table)
    run_probe_protocol(train, test, grid, build, ...)  -> ProbeResult
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from scott.eval.knn import topk_accuracy
from scott.optim_groups import adamw
from scott.schedules import warmup_cosine

__all__ = [
    "FeatureSet",
    "ProbeResult",
    "carve_validation",
    "make_grid",
    "grid_edges",
    "train_classifier",
    "evaluate_classifier",
    "select_hyperparameters",
    "run_probe_protocol",
]

BuildFn = Callable[[dict], nn.Module]
"""Builds a fresh, untrained probe for a hyper-parameter setting."""


@dataclass(frozen=True)
class FeatureSet:
    """Features ``[N, ...]`` with integer labels ``[N]`` (kept on the CPU)."""

    features: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.features.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.features.shape[0]} features but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> "FeatureSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return FeatureSet(self.features[index], self.labels[index])

    @staticmethod
    def concat(a: "FeatureSet", b: "FeatureSet") -> "FeatureSet":
        return FeatureSet(torch.cat([a.features, b.features]), torch.cat([a.labels, b.labels]))


@dataclass
class ProbeResult:
    """Outcome of :func:`run_probe_protocol` (everything a results JSON needs)."""

    best: dict
    val: dict
    test: dict
    table: list = field(default_factory=list)
    n_fit: int = 0
    n_val: int = 0
    n_refit: int = 0
    n_test: int = 0
    refit: str = "train+val"
    seed: int = 0

    def to_dict(self) -> dict:
        return {
            "best": self.best,
            "val": self.val,
            "test": self.test,
            "selection": self.table,
            "n_fit": self.n_fit,
            "n_val": self.n_val,
            "n_refit": self.n_refit,
            "n_test": self.n_test,
            "refit": self.refit,
            "seed": self.seed,
            "best_at_grid_edge": grid_edges(self.best, [{k: v for k, v in r.items() if not k.startswith("val_")}
                                                        for r in self.table]),
        }


def _split_indices(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit / validation indices from the project's splitter (``scott.data.datasets``)."""
    from scott.data.datasets import split_train_val

    fit_idx, val_idx = split_train_val(labels.numpy(), val_fraction, seed)
    return _as_index(fit_idx), _as_index(val_idx)


def _as_index(idx) -> torch.Tensor:
    return torch.as_tensor(np.asarray(idx), dtype=torch.long)


def carve_validation(train: FeatureSet, val_fraction: float, seed: int) -> tuple[FeatureSet, FeatureSet]:
    """Cut the labelled train set into (fit, val); disjoint, deterministic in ``seed``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    fit_idx, val_idx = _split_indices(train.labels, val_fraction, seed)
    if len(fit_idx) == 0 or len(val_idx) == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves an empty fit or validation set ({len(train)} samples)")
    if set(fit_idx.tolist()) & set(val_idx.tolist()):
        raise ValueError("split_train_val returned overlapping fit and validation indices")
    return train.subset(fit_idx), train.subset(val_idx)


def grid_edges(best: dict, grid: Sequence[dict]) -> list[str]:
    """Numeric axes (varied in ``grid``) on which ``best`` sits at the largest or smallest value:
    a hint that the grid should be extended."""
    edges = []
    for key, value in best.items():
        values = {p[key] for p in grid if key in p}
        if len(values) > 1 and all(isinstance(v, (int, float)) for v in values):
            if value in (min(values), max(values)):
                edges.append(key)
    return edges


def make_grid(**axes: Sequence[Any]) -> list[dict]:
    """Cartesian product of named axes: ``make_grid(lr=[.1, 1], epochs=[10])`` -> list of dicts."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def train_classifier(
    model: nn.Module,
    data: FeatureSet,
    epochs: int,
    lr: float,
    batch_size: int = 256,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    warmup_epochs: int = 0,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Train ``model`` on ``data`` with cross-entropy, mini-batches shuffled from ``seed``, cosine lr.

    ``optimizer``: "sgd" (momentum 0.9, the MAE linear-probe recipe) or "adamw".
    """
    device = torch.device(device or "cpu")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = adamw(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r} (sgd|adamw)")
    n = len(data)
    batch_size = max(1, min(batch_size, n))
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = warmup_epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() < 2 and n >= 2:
                continue  # BatchNorm cannot train on a single sample
            x = data.features[idx].to(device, non_blocking=True).float()
            y = data.labels[idx].to(device).long()
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, total, lr, warmup, start=lr / max(warmup, 1))
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


@torch.no_grad()
def predict_scores(model: nn.Module, features: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits ``[N, C]`` of ``model`` in eval mode (returned on the CPU)."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(features[i : i + batch_size].to(device).float()).cpu()
           for i in range(0, features.shape[0], batch_size)]
    return torch.cat(out)


def mean_per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Average over the classes present in ``labels`` of the per-class top-1 accuracy."""
    accs = [float((pred[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    return sum(accs) / len(accs)


def evaluate_classifier(model: nn.Module, data: FeatureSet) -> dict:
    """Top-1, top-5 and mean per-class accuracy (fractions) of ``model`` on ``data``."""
    scores = predict_scores(model, data.features)
    top1, top5 = topk_accuracy(scores, data.labels, (1, 5))
    mpc = mean_per_class_accuracy(scores.argmax(dim=1), data.labels.long())
    return {"top1": top1, "top5": top5, "mean_per_class": mpc}


def fit_probe(build: BuildFn, data: FeatureSet, params: dict, seed: int, device=None) -> nn.Module:
    """Build a probe for ``params`` (seeded init) and train it on ``data``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(params)
    train_kwargs = {k: v for k, v in params.items() if k in _TRAIN_KEYS}
    return train_classifier(model, data, seed=seed, device=device, **train_kwargs)


_TRAIN_KEYS = {"epochs", "lr", "batch_size", "optimizer", "weight_decay", "warmup_epochs"}


def select_hyperparameters(
    fit: FeatureSet,
    val: FeatureSet,
    grid: Sequence[dict],
    build: BuildFn,
    seed: int = 0,
    device=None,
    on_result: Callable[[dict], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Train one probe per grid point on ``fit`` and keep the best by validation top-1.

    Receives ONLY the fit and validation sets: the test split never reaches this function.
    Ties go to the earlier grid point. Returns ``(best_params, table)`` where ``table`` lists every
    grid point with its validation metrics.
    """
    if not grid:
        raise ValueError("empty hyper-parameter grid")
    table = []
    best, best_acc = None, -1.0
    for params in grid:
        model = fit_probe(build, fit, params, seed, device)
        metrics = evaluate_classifier(model, val)
        row = {**params, **{f"val_{k}": v for k, v in metrics.items()}}
        table.append(row)
        if on_result is not None:
            on_result(row)
        if metrics["top1"] > best_acc:
            best, best_acc = dict(params), metrics["top1"]
    return best, table


def run_probe_protocol(
    train: FeatureSet,
    test: FeatureSet,
    grid: Sequence[dict],
    build: BuildFn,
    val_fraction: float = 0.1,
    seed: int = 0,
    refit: str = "train+val",
    device=None,
    select_fn: Callable[..., tuple[dict, list[dict]]] = select_hyperparameters,
    on_result: Callable[[dict], None] | None = None,
) -> ProbeResult:
    """Select on a validation split carved from ``train``, retrain, evaluate ``test`` once.

    ``refit``: "train+val" retrains the chosen setting on the whole labelled train split, "train"
    on the fit part only. ``select_fn`` is called as ``select_fn(fit, val, grid, build, seed=...,
    device=..., on_result=...)`` and never receives ``test``.
    """
    if refit not in ("train", "train+val"):
        raise ValueError(f"refit must be 'train' or 'train+val', got {refit!r}")
    fit, val = carve_validation(train, val_fraction, seed)
    best, table = select_fn(fit, val, grid, build, seed=seed, device=device, on_result=on_result)
    val_row = next((r for r in table if all(r.get(k) == v for k, v in best.items())), {})
    val_metrics = {k[4:]: v for k, v in val_row.items() if k.startswith("val_")}
    refit_set = FeatureSet.concat(fit, val) if refit == "train+val" else fit
    model = fit_probe(build, refit_set, best, seed, device)
    test_metrics = evaluate_classifier(model, test)  # the one and only look at the test split
    return ProbeResult(
        best=best,
        val=val_metrics,
        test=test_metrics,
        table=table,
        n_fit=len(fit),
        n_val=len(val),
        n_refit=len(refit_set),
        n_test=len(test),
        refit=refit,
        seed=seed,
    )
