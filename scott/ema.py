"""Exponential moving average of a module's weights (the MIM-JEPA target encoder)."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["update_ema"]


@torch.no_grad()
def update_ema(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: ``target = momentum * target + (1 - momentum) * online`` for every parameter.

    Buffers are copied from ``online``. Both modules must have the same parameter names and
    shapes (``target`` is normally a copy of ``online``). ``momentum=1`` keeps ``target``,
    ``momentum=0`` copies ``online``.
    """
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_params = dict(target.named_parameters())
    o_params = dict(online.named_parameters())
    if t_params.keys() != o_params.keys():
        missing = sorted(set(t_params) ^ set(o_params))[:5]
        raise ValueError(f"target and online modules have different parameters, e.g. {missing}")
    names = list(t_params)
    tp = [t_params[n] for n in names]
    op = [o_params[n].detach().to(dtype=t_params[n].dtype, device=t_params[n].device) for n in names]
    if tp:
        if m == 0.0:
            torch._foreach_copy_(tp, op)
        elif m != 1.0:
            torch._foreach_lerp_(tp, op, 1.0 - m)
    t_bufs = dict(target.named_buffers())
    for name, buf in online.named_buffers():
        if name in t_bufs:
            t_bufs[name].copy_(buf)
