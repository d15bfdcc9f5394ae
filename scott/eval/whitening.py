"""PCA whitening of frozen features, fit on the labelled bank (never on the queries).

Cosine kNN on raw features is dominated by their few largest directions of variance; PCA
whitening (retrieval's standard post-processing, e.g. Jegou & Chum, ECCV 2012) removes the bank's
mean, keeps its ``dim`` leading principal directions and scales each to unit variance, so every
kept direction weighs the same in the cosine. It uses no labels::

    white = fit_whitening(bank_features, dim=512)
    knn_classify(white(bank_features), bank_labels, white(query_features), query_labels, k=20)
    white.truncate(256)      # the same fit, fewer directions kept

``dim`` is the read-out's one setting: choose it on a validation split (``tools/eval_knn.py
--val-only --whiten D``), for every row of a comparison alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Whitening", "fit_whitening", "EXACT_MAX_DIM"]

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
