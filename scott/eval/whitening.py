"""PCA whitening of frozen features, fit on the labelled bank (never on the queries).

Cosine kNN on raw features is dominated by their few largest directions of variance; PCA
whitening (retrieval's standard post-processing, e.g. Jegou & Chum, ECCV 2012) removes the bank's
mean, keeps its ``dim`` leading principal directions and scales each to unit variance, so every
kept direction weighs the same in the cosine. It uses no labels::

    white = fit_whitening(bank_features, dim=512)
    knn_classify(white(bank_features), bank_labels, white(query_features), query_labels, k=20)
    white.truncate(256)      # the same fit, fewer directions kept

``dim`` is the read-out's one setting: :func:`whitened_knn` chooses it on a validation split
carved from the bank and reads the queries once (``benchmarks/quality.py --whiten-dims``);
``tools/eval_knn.py --val-only --whiten D`` scores one choice by hand.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Whitening", "fit_whitening", "whitened_knn", "EXACT_MAX_DIM"]

#: Feature sizes up to this use the exact covariance eigendecomposition (a D x D float64 matrix);
#: larger ones a seeded randomised PCA of the centred bank (``torch.pca_lowrank``).
EXACT_MAX_DIM = 8192


@dataclass(frozen=True)
class Whitening:
    """``x -> (x - mean) @ projection``: ``mean [D]``, ``projection [D, dim]`` (principal
    directions divided by the square root of their variance), ``variances [dim]`` (of the bank,
    largest first)."""

    mean: torch.Tensor
    projection: torch.Tensor
    variances: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])

    def truncate(self, dim: int) -> "Whitening":
        """The whitening to the leading ``dim`` of these directions (the same fit, fewer kept)."""
        if not 1 <= dim <= self.dim:
            raise ValueError(f"can truncate a {self.dim}-dim whitening to 1..{self.dim} directions, not {dim}")
        return Whitening(self.mean, self.projection[:, :dim], self.variances[:dim])

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"whitening was fit on {self.mean.shape[0]}-dim features, got {tuple(features.shape)}")
        return (features.float() - self.mean) @ self.projection


def fit_whitening(features: torch.Tensor, dim: int, eps: float = 1e-6, exact_max_dim: int = EXACT_MAX_DIM,
                  seed: int = 0) -> Whitening:
    """PCA whitening of ``features [N, D]`` to ``dim`` directions.

    ``dim`` must lie in [1, min(N - 1, D)] (a centred bank of N features spans at most N - 1
    directions). Variances below ``eps`` times the largest are floored there, so a nearly flat
    direction is not blown up. Features of at most ``exact_max_dim`` dimensions use the exact
    eigendecomposition of the covariance (float64); larger ones a randomised PCA drawn from
    ``seed`` without touching the global random state. Directions are signed so that their
    largest-magnitude loading is positive (the result does not depend on the solver's sign choice).
    """
    if features.ndim != 2:
        raise ValueError(f"whitening expects 2-D features [N, D], got {tuple(features.shape)}")
    n, d = features.shape
    if not 1 <= dim <= min(n - 1, d):
        raise ValueError(f"whitening dim must be in [1, {min(n - 1, d)}] for {n} features of {d} dims, got {dim}")
    mean = features.double().mean(0)
    centred = features.float() - mean.float()
    if d <= exact_max_dim:
        cov = (centred.T @ centred).double() / (n - 1)   # float32 product, float64 eigendecomposition
        values, vectors = torch.linalg.eigh(cov)
        values, vectors = values.flip(0)[:dim], vectors.flip(1)[:, :dim]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, s, v = torch.pca_lowrank(centred.double(), q=min(dim + 10, n - 1, d), center=False, niter=4)
        values, vectors = (s[:dim] ** 2) / (n - 1), v[:, :dim]
    flip = vectors.gather(0, vectors.abs().argmax(0, keepdim=True)).sign()
    vectors = vectors * torch.where(flip == 0, torch.ones_like(flip), flip)
    values = values.clamp(min=float(values[0]) * eps if values[0] > 0 else eps)
    return Whitening(mean.float(), (vectors / values.sqrt()).float(), values.float())


def whitened_knn(train, test, dims, k: int = 20, temperature: float = 0.07, val_fraction: float = 0.1,
                 seed: int = 0) -> dict:
    """Weighted kNN top-1 of ``test`` against ``train`` (:class:`scott.eval.protocol.FeatureSet`)
    after PCA whitening, its ``dim`` chosen on validation: the bank is carved (stratified, seeded,
    as the probes carve it), every candidate of ``dims`` that the fit part can span is fit on the
    fit part and scored on the carved part, the best (the smaller on a tie) is refit on the whole
    bank, and the queries are read once. Returns ``knn_white`` (test top-1), ``knn_white_dim`` and
    ``knn_white_val`` ({dim: validation top-1})."""
    from scott.eval.knn import knn_classify
    from scott.eval.protocol import carve_validation

    fit, val = carve_validation(train, val_fraction, seed)
    span = min(len(fit) - 1, fit.features.shape[1])
    candidates = sorted({int(d) for d in dims if 1 <= int(d) <= span})
    if not candidates:
        raise ValueError(f"no whitening dim in {list(dims)} fits {len(fit)} fit features of "
                         f"{fit.features.shape[1]} dims (at most {span})")
    largest = fit_whitening(fit.features, candidates[-1], seed=seed)
    scores = {}
    for d in candidates:
        white = largest.truncate(d)
        scores[d] = knn_classify(white(fit.features), fit.labels, white(val.features), val.labels,
                                 k=k, temperature=temperature)[0]
    best = max(candidates, key=lambda d: (scores[d], -d))
    white = fit_whitening(train.features, best, seed=seed)
    top1 = knn_classify(white(train.features), train.labels, white(test.features), test.labels,
                        k=k, temperature=temperature)[0]
    return {"knn_white": top1, "knn_white_dim": best, "knn_white_val": scores}
