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

``objective.decorrelation_center`` says what each token's channels are measured against:
``batch`` (VICReg's, the default) centres every channel over all tokens of the batch, so the
differences between grid positions (a border token against a central one) count as variance;
``position`` first removes, from each token, the mean of the batch's tokens at the same grid
position (``center_by_position``), so the terms see only how images differ at one position,
which is what a comparison of the flattened token grids (the CPU recipes' features) reads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["variance_term", "covariance_term", "center_by_position"]


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


def center_by_position(z: torch.Tensor, positions: torch.Tensor, num_positions: int) -> torch.Tensor:
    """``z [M, C]`` minus, row by row, the mean of the rows with the same grid position.

    ``positions [M]`` holds each row's position in ``[0, num_positions)``. A position held by a
    single row gives that row zeros (it carries no between-image variation in this batch).
    """
    _check(z)
    if positions.shape != (z.shape[0],):
        raise ValueError(f"expected one position per row ({z.shape[0]}), got shape {tuple(positions.shape)}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= num_positions):
        raise ValueError(f"positions must lie in [0, {num_positions}), got "
                         f"[{int(positions.min())}, {int(positions.max())}]")
    z = z.float()
    sums = z.new_zeros(num_positions, z.shape[1]).index_add_(0, positions, z)
    counts = torch.bincount(positions, minlength=num_positions).clamp(min=1).to(z.dtype)
    return z - (sums / counts.unsqueeze(1))[positions]
