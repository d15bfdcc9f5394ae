"""Learning-rate, weight-decay and EMA-momentum schedules as pure functions of the global step.

Every function maps an optimiser step (0-based) to a value, so resuming a run only needs the
step counter. ``total_steps`` is the number of optimiser steps of the whole run; steps at or
beyond ``total_steps - 1`` give the final value. :func:`warmup_cosine` is the one warm-up +
cosine curve of the project (pretraining, linear probes, fine-tuning). The recipe-level
functions take complete, validated sections: defaults live in ``scott.config`` only.
"""
from __future__ import annotations

import math

__all__ = ["warmup_cosine", "warmup_steps", "lr_at", "wd_at", "momentum_at", "linear_at", "ema_initial_share"]


def linear_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear from ``start`` at step 0 to ``end`` at step ``total_steps - 1`` (constant after)."""
    if total_steps <= 1:
        return float(end)
    t = min(max(step, 0), total_steps - 1) / (total_steps - 1)
    return float(start + (end - start) * t)


def warmup_steps(total_steps: int, steps_per_epoch: int, warmup_epochs: float) -> int:
    """Warm-up length in steps, never longer than the run itself."""
    return max(0, min(int(round(warmup_epochs * steps_per_epoch)), int(total_steps)))


def warmup_cosine(step: int, total_steps: int, peak: float, warmup: int = 0, start: float = 0.0,
                  floor: float = 0.0, flat: int = 0) -> float:
    """The project's one warm-up + cosine schedule, in steps.

    Linear ``start -> peak`` over the first ``warmup`` steps (reaching ``peak`` at step
    ``warmup``), flat at ``peak`` for ``flat`` more steps, then a cosine decay that reaches
    ``floor`` exactly at step ``total_steps - 1`` (and stays there). A run shorter than its
    warm-up only warms up (it ends below ``peak``).
    """
    step = max(int(step), 0)
    warm = max(0, min(int(warmup), int(total_steps)))
    if step < warm:
        return start + (peak - start) * step / warm
    rest = max(int(total_steps) - warm, 0)
    flat = min(max(int(flat), 0), rest)
    t = step - warm - flat
    if t < 0:
        return peak
    decay = rest - flat  # number of steps in the cosine phase
    if decay <= 1 or t >= decay - 1:
        return floor if decay >= 1 else peak
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * t / (decay - 1)))


def lr_at(step: int, total_steps: int, steps_per_epoch: int, optim_cfg: dict) -> float:
    """Pretraining learning rate at ``step`` (the paper's schedule), from a complete ``optim``
    section (:func:`scott.config.resolve_recipe` fills every key; no defaults here).

    :func:`warmup_cosine` with ``start_lr -> lr`` over ``warmup_epochs``, flat for
    ``flat_fraction`` of the steps after the warm-up, cosine to ``min_lr`` at the last step.
    """
    warm = warmup_steps(total_steps, steps_per_epoch, float(optim_cfg["warmup_epochs"]))
    flat = int(round(float(optim_cfg["flat_fraction"]) * max(int(total_steps) - warm, 0)))
    return warmup_cosine(step, total_steps, float(optim_cfg["lr"]), warm, float(optim_cfg["start_lr"]),
                         float(optim_cfg["min_lr"]), flat)


def wd_at(step: int, total_steps: int, optim_cfg: dict) -> float:
    """Weight decay: linear ``weight_decay -> weight_decay_end`` over the run."""
    return linear_at(step, total_steps, float(optim_cfg["weight_decay"]), float(optim_cfg["weight_decay_end"]))


def momentum_at(step: int, total_steps: int, objective_cfg: dict) -> float:
    """EMA momentum of the target encoder: linear ``ema_start -> ema_end`` over the run."""
    return linear_at(step, total_steps, float(objective_cfg["ema_start"]), float(objective_cfg["ema_end"]))


def ema_initial_share(total_steps: int, objective_cfg: dict, start_step: int = 0) -> float:
    """Weight the EMA target still gives its initial weights after ``total_steps`` updates.

    After updates ``t = start_step .. total_steps - 1`` with momentum ``m_t`` the target is
    ``prod(m_t) * initial + (1 - prod(m_t)) * (average of the online weights)``; this returns
    ``prod(m_t)``. With the default 0.996 -> 1 schedule it is about ``exp(-0.002 T)``: 63 % for a
    234-step run, 4 % for 1,560 steps. A large share means the exported target encoder is
    still mostly its random initialisation.
    """
    log_share = 0.0
    for step in range(int(start_step), int(total_steps)):
        m = momentum_at(step, total_steps, objective_cfg)
        if m <= 0.0:
            return 0.0
        log_share += math.log(m)
    return math.exp(log_share)
