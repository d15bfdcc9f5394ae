"""VICReg's variance and covariance terms (Bardes et al., 2022), as C-JEPA adds them to I-JEPA.

Both act on a batch of feature vectors ``z [M, C]`` (here: every visible context token of the
batch, one row each) and keep the representation spread out without negatives:

- ``variance_term``: mean over channels of ``relu(1 - sqrt(var + eps))``, zero once every
  channel's standard deviation over the batch is at least 1 (prevents collapse);
- ``covariance_term``: the squared off-diagonal entries of the channels' covariance matrix,
  summed and divided by ``C`` (decorrelates the channels, so no few loud directions dominate
  a cosine comparison).

The recipe keys ``objective.var_weight`` and ``objective.cov_weight`` weight them (default 0:
off, and the objective's numbers are exactly those without the terms).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["variance_term", "covariance_term"]


def _check(z: torch.Tensor) -> None:
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"expected features [M >= 2, C], got shape {tuple(z.shape)}")


def variance_term(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``mean_c relu(1 - sqrt(var_c(z) + eps))`` with the unbiased variance over the rows."""
    _check(z)
    std = torch.sqrt(z.float().var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """``sum_{i != j} cov(z)_ij ** 2 / C`` with the unbiased covariance over the rows."""
    _check(z)
    z = z.float()
    m, c = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (m - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return off.pow(2).sum() / c
