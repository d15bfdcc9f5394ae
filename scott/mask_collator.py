"""Masks are drawn where the data is made: in the DataLoader's workers (I-JEPA's mask collator).

The batch sampler (:class:`scott.step_sampler.ProcessBatches`) yields, per micro-batch, keys
``(epoch, index, step, shard)``. :class:`StepItems` reads ``dataset[(epoch, index)]`` and keeps
``(step, shard)`` next to the views; :class:`MaskCollator` stacks the views and draws the
micro-batch's masks from ``(seed, step, shard)``, the same pure function the training loop used
to call, so masks (and resumed runs) are bit-identical and cost the training process nothing.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

__all__ = ["StepItems", "MaskCollator"]


class StepItems(torch.utils.data.Dataset):
    """``items[(epoch, index, step, shard)] -> (dataset[(epoch, index)], (step, shard))``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index, step, shard = key
        return self.dataset[(epoch, index)], (int(step), int(shard))


class MaskCollator:
    """Collate one micro-batch of :class:`StepItems` into ``{"views", "masks", "step", "shard"}``.

    ``mask_fn(batch, seed, step, shard)`` draws the masks (e.g. :class:`scott.masks.StepMasks`);
    ``collate_fn`` stacks the views (default: torch's ``default_collate``). Every item of a
    micro-batch must come from the same ``(step, shard)``.
    """

    def __init__(self, mask_fn: Callable[[int, int, int, int], Any], seed: int,
                 collate_fn: Callable | None = None):
        self.mask_fn, self.seed, self.collate_fn = mask_fn, int(seed), collate_fn

    def __call__(self, items: Sequence[tuple[Any, tuple[int, int]]]) -> dict:
        keys = {key for _, key in items}
        if len(keys) != 1:
            raise ValueError(f"a micro-batch mixes steps/shards {sorted(keys)}")
        (step, shard), = keys
        collate = self.collate_fn or torch.utils.data.default_collate
        return {"views": collate([views for views, _ in items]),
                "masks": self.mask_fn(len(items), self.seed, step, shard),
                "step": step, "shard": shard}
