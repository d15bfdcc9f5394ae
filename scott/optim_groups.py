"""The project's one rule for which parameters get weight decay, and AdamW groups built from it.

A parameter is decayed unless it is 1-D (norms, biases, scales), its name ends in ``.bias``, or a
module that holds it lists it in ``no_weight_decay()`` (timm's convention; the encoder lists its
mask token). Pretraining (the objective's trainable modules, weight decay set by hand each
step) and fine-tuning (layer-wise lr scales) both build their groups here.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn

__all__ = ["no_weight_decay_names", "decays", "param_groups", "adamw"]

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names (relative to ``model``) of the parameters some submodule's ``no_weight_decay()``
    names; each name there is relative to the module that returns it."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names.update(f"{prefix}.{n}" if prefix else n for n in listed())
    return names


def decays(name: str, param: nn.Parameter, no_decay: set[str]) -> bool:
    """Whether ``param`` (called ``name``) is weight-decayed."""
    return param.ndim > 1 and not name.endswith(".bias") and name not in no_decay


def param_groups(modules: nn.Module | Mapping[str, nn.Module], weight_decay: float,
                 layer_of: Callable[[str], int] | None = None, layer_decay: float = 1.0,
                 top_layer: int = 0) -> list[dict]:
    """AdamW groups of the trainable parameters of ``modules`` (one module, or named modules
    whose names prefix their parameters'), split by :func:`decays` and, for layer-wise lr decay,
    by ``layer_of(name)``: a parameter of layer ``l`` gets ``lr_scale = layer_decay ** (top_layer
    - l)`` (every scale is 1.0 without ``layer_of``).

    Each group has ``params``, ``weight_decay`` (``weight_decay`` or 0), ``apply_wd`` (whether a
    per-step weight-decay schedule applies to it), ``layer``, ``lr_scale`` and a readable
    ``name``. Groups come in a stable order: by layer, decayed before not decayed.
    """
    named = modules.items() if isinstance(modules, Mapping) else [("", modules)]
    groups: dict[tuple[int, bool], dict] = {}
    for prefix, module in named:
        skip = no_weight_decay_names(module)
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            decay = decays(name, param, skip)
            layer = int(layer_of(f"{prefix}.{name}" if prefix else name)) if layer_of is not None else top_layer
            group = groups.setdefault((layer, decay), {
                "params": [], "weight_decay": float(weight_decay) if decay else 0.0, "apply_wd": decay,
                "layer": layer, "lr_scale": float(layer_decay) ** (top_layer - layer),
                "name": f"{'decay' if decay else 'no_decay'}/layer{layer}"})
            group["params"].append(param)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def adamw(params, lr: float, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` (tensors or groups), fused when every parameter is a
    floating tensor on one CPU or CUDA device (one kernel instead of a dozen small ops per
    parameter: 5x faster on a 2-core CPU for the 0.86 M trainable parameters of the demo
    with a 2 x 128 predictor). The update is AdamW's;
    only the summation order of its arithmetic differs from the per-parameter loop."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    devices = {p.device for p in tensors}
    fused = (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
             and all(p.dtype in _FUSED_DTYPES for p in tensors))
    return torch.optim.AdamW(params, lr=lr, fused=fused or None, **kwargs)
