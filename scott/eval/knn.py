"""Weighted k-nearest-neighbour classification of frozen features (DINO protocol).

Features are L2-normalised, similarity is the cosine, the ``k`` most similar training
features vote for their label with weight ``exp(similarity / temperature)``.

Public API:
    knn_predict(train_feats, train_labels, test_feats, k, ...)   -> class scores [N_test, C]
    knn_classify(train_feats, train_labels, test_feats, test_labels, k, ...) -> (top1, top5)
    knn_classify_many(train_feats, train_labels, test_feats, test_labels, ks, ...)
        -> {k: (top1, top5)}   (one similarity pass for every k)
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_classify", "knn_classify_many", "topk_accuracy"]


def _check_inputs(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(
            f"kNN expects 2-D features [N, D]; got train {tuple(train_feats.shape)}, test {tuple(test_feats.shape)}"
        )
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"feature dims differ: train {train_feats.shape[1]} vs test {test_feats.shape[1]}")
    if train_labels.ndim != 1 or train_labels.shape[0] != train_feats.shape[0]:
        raise ValueError(
            f"train_labels must be [N_train]={train_feats.shape[0]}; got {tuple(train_labels.shape)}"
        )
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    if train_labels.numel() and int(train_labels.min()) < 0:
        raise ValueError("labels must be non-negative class indices")


def _clamp_k(k: int, n_train: int) -> int:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n_train:
        warnings.warn(f"kNN: k={k} exceeds the {n_train} training features; using k={n_train}", stacklevel=3)
        return n_train
    return k


def _resolve_num_classes(train_labels: torch.Tensor, num_classes: int | None) -> int:
    inferred = int(train_labels.max()) + 1
    if num_classes is None:
        return inferred
    if num_classes < inferred:
        raise ValueError(f"num_classes={num_classes} but train labels go up to {inferred - 1}")
    return num_classes


def _scores_many(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    batch_size: int,
) -> dict[int, torch.Tensor]:
    """Class scores for each k in ``ks`` (already clamped), computed batch by batch."""
    train_n = F.normalize(train_feats.float(), dim=1)
    test_n = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.long().to(train_n.device)
    k_max = max(ks)
    out = {k: torch.zeros(test_n.shape[0], num_classes) for k in ks}
    for start in range(0, test_n.shape[0], batch_size):
        queries = test_n[start : start + batch_size].to(train_n.device)
        sims = queries @ train_n.T  # [b, N_train]
        top_sims, top_idx = sims.topk(k_max, dim=1, largest=True, sorted=True)
        top_labels = labels[top_idx]  # [b, k_max]
        weights = (top_sims / temperature).exp()
        for k in ks:
            votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
            votes.scatter_add_(1, top_labels[:, :k], weights[:, :k])
            out[k][start : start + queries.shape[0]] = votes.cpu()
    return out


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Weighted kNN class scores ``[N_test, num_classes]`` (sum of exp(cos/T) over the k neighbours).

    ``num_classes`` defaults to ``max(train_labels) + 1``; ``k`` larger than the training set is
    clamped to it (with a warning).
    """
    _check_inputs(train_feats, train_labels, test_feats)
    k = _clamp_k(k, train_feats.shape[0])
    classes = _resolve_num_classes(train_labels, num_classes)
    return _scores_many(train_feats, train_labels, test_feats, [k], temperature, classes, batch_size)[k]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> list[float]:
    """Fraction of rows whose label is among the ``k`` highest scores, for each k.

    ``k`` above the number of classes is clamped (top-5 of a 3-class problem is top-3, i.e. 1.0).
    Ties are broken by ``torch.topk`` (lowest class index first for exact ties).
    """
    labels = labels.long().view(-1)
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows but {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("cannot compute accuracy on an empty set")
    ks = list(ks)
    k_max = min(max(ks), scores.shape[1])
    ranked = scores.topk(k_max, dim=1).indices  # [N, k_max]
    hits = ranked == labels[:, None]
    return [float(hits[:, : min(k, k_max)].any(dim=1).float().mean()) for k in ks]


def knn_classify_many(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 256,
) -> dict[int, tuple[float, float]]:
    """``{k: (top1, top5)}`` for every requested k (keys are the requested, unclamped k)."""
    _check_inputs(train_feats, train_labels, test_feats)
    if test_labels.shape[0] != test_feats.shape[0]:
        raise ValueError(f"{test_feats.shape[0]} test features but {test_labels.shape[0]} test labels")
    classes = _resolve_num_classes(train_labels, num_classes)
    clamped = {k: _clamp_k(k, train_feats.shape[0]) for k in ks}
    scores = _scores_many(
        train_feats, train_labels, test_feats, sorted(set(clamped.values())), temperature, classes, batch_size
    )
    results = {}
    for k, kc in clamped.items():
        top1, top5 = topk_accuracy(scores[kc], test_labels, (1, 5))
        results[k] = (top1, top5)
    return results


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 256,
) -> tuple[float, float]:
    """Weighted kNN top-1 and top-5 accuracy (fractions in [0, 1]) of ``test_labels``."""
    return knn_classify_many(
        train_feats, train_labels, test_feats, test_labels, [k], temperature, num_classes, batch_size
    )[k]
