"""Colour operations on one float image tensor ``[C, H, W]`` in ``[0, 1]``, for the pretraining
views: the meaning of torchvision's tensor functions (``adjust_brightness``, ``adjust_contrast``,
``adjust_saturation``, ``adjust_hue``, ``gaussian_blur`` with reflect padding), computed with
fewer and cheaper operations for the small images this project trains on.

Brightness and contrast are torchvision's formulas term for term (the same floats); saturation
and hue leave a 1-channel image unchanged (as torchvision does) and call torchvision for 3
channels. The blur is the separable Gaussian applied as two small matrix products
(``A_h @ x @ A_w^T``, the reflect padding folded into the matrices) instead of a 2-D ``conv2d``
on a padded copy: the same filter, equal to torchvision's up to float rounding (tested).
"""
from __future__ import annotations

import torch
import torchvision.transforms.functional as TF

__all__ = ["adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "gaussian_blur"]


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``clamp(factor * x, 0, 1)``: torchvision's blend with a black image."""
    return (float(factor) * x).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the mean grey level of the image (its luma for 3 channels)."""
    if x.shape[-3] != 1:
        return TF.adjust_contrast(x, factor)
    factor = float(factor)
    mean = torch.mean(x, dim=(-3, -2, -1), keepdim=True)
    return (factor * x + (1.0 - factor) * mean).clamp(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x if x.shape[-3] == 1 else TF.adjust_saturation(x, factor)


def adjust_hue(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x if x.shape[-3] == 1 else TF.adjust_hue(x, factor)


def _gaussian_taps(kernel_size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """torchvision's 1-D Gaussian kernel (``linspace`` positions, normalised to sum 1)."""
    half = (kernel_size - 1) * 0.5
    pos = torch.linspace(-half, half, steps=kernel_size, dtype=dtype)
    pdf = torch.exp(-0.5 * (pos / sigma).pow(2))
    return pdf / pdf.sum()


def _reflect_taps_matrix(n: int, kernel_size: int) -> torch.Tensor:
    """``R [K, n, n]``: ``R[j, i, r] = 1`` where output ``i``'s tap ``j`` reads input ``r``
    (reflect padding by ``K // 2``, which needs ``K // 2 < n``)."""
    half = kernel_size // 2
    if half >= n:
        raise ValueError(f"blur kernel {kernel_size} is too large for a side of {n} px (reflect padding)")
    i = torch.arange(n)[None, :]
    j = torch.arange(kernel_size)[:, None]
    src = i + j - half
    src = torch.where(src < 0, -src, src)
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
    return torch.nn.functional.one_hot(src, n).to(torch.float32)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float,
                  cache: dict | None = None) -> torch.Tensor:
    """Gaussian blur of ``[C, H, W]`` with an odd ``kernel_size`` and ``sigma`` in both
    directions, reflect padding: torchvision's ``gaussian_blur(x, [k, k], [sigma, sigma])``.
    ``cache`` (a dict the caller keeps) holds the reflect-tap matrices per side length."""
    if kernel_size % 2 != 1:
        raise ValueError(f"blur kernel size must be odd, got {kernel_size}")
    cache = {} if cache is None else cache
    h, w = x.shape[-2:]
    taps = _gaussian_taps(kernel_size, float(sigma), x.dtype)
    mats = []
    for n in (h, w):
        key = (n, kernel_size)
        if key not in cache:
            cache[key] = _reflect_taps_matrix(n, kernel_size)
        mats.append(torch.tensordot(taps, cache[key].to(x.dtype), dims=1))  # [n, n]
    a_h, a_w = mats
    return a_h @ x @ a_w.T
