"""The data order of a pretraining run as a pure function of ``(seed, step)``.

:class:`StepSampler` cuts the global batch of step ``s`` out of a permutation seeded by
``(seed, epoch)`` (drop_last) and splits it into ``num_shards = processes x accum_steps``
shards; shard ``k = rank * accum_steps + micro`` is one micro-batch of one process, so the global
batch of a step does not depend on how many processes share it, and a resumed run sees the same
data. :class:`ProcessBatches` is one process's DataLoader ``batch_sampler``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

__all__ = ["StepSampler", "ProcessBatches"]


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch), 0x5C077]).generate_state(1)[0])


@dataclass(frozen=True)
class StepSampler:
    """Deterministic, resumable data order: ``(epoch, index)`` pairs as a function of the step.

    The epoch's permutation comes from ``(seed, epoch)``; step ``s`` of the run takes the slice
    ``[b * G, (b + 1) * G)`` with ``b = s % steps_per_epoch`` (incomplete tail dropped). The slice
    is split into ``num_shards`` equal contiguous shards.
    """

    num_samples: int
    global_batch: int
    num_shards: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.global_batch % self.num_shards:
            raise ValueError(f"global batch {self.global_batch} is not divisible into {self.num_shards} shards "
                             "(processes x accumulation steps)")
        if self.num_samples < self.global_batch:
            raise ValueError(f"the dataset has {self.num_samples} images, fewer than one global batch "
                             f"({self.global_batch}); lower optim.batch_size")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def shard_size(self) -> int:
        return self.global_batch // self.num_shards

    def epoch_of(self, step: int) -> int:
        return int(step) // self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=gen)

    def global_indices(self, step: int, perm: torch.Tensor | None = None) -> torch.Tensor:
        """Dataset indices of the whole global batch of ``step``."""
        epoch, b = divmod(int(step), self.steps_per_epoch)
        perm = self.permutation(epoch) if perm is None else perm
        return perm[b * self.global_batch:(b + 1) * self.global_batch]

    def shard(self, step: int, shard: int, perm: torch.Tensor | None = None) -> list[tuple[int, int]]:
        """The ``(epoch, index)`` pairs of shard ``shard`` of ``step``."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range [0, {self.num_shards})")
        idx = self.global_indices(step, perm)[shard * self.shard_size:(shard + 1) * self.shard_size]
        epoch = self.epoch_of(step)
        return [(epoch, int(i)) for i in idx]


class ProcessBatches:
    """Batch sampler of one process: micro-batches of steps ``[start_step, end_step)``.

    Yields, per step, ``accum_steps`` lists of ``(epoch, index, step, shard)`` keys (shard
    ``rank * accum_steps + micro``; the first two are :meth:`StepSampler.shard`'s pairs, the
    last two tell the mask collator which masks to draw). Usable as a DataLoader ``batch_sampler``.
    """

    def __init__(self, sampler: StepSampler, rank: int, accum_steps: int, start_step: int, end_step: int):
        if sampler.num_shards % accum_steps:
            raise ValueError("num_shards must be processes x accum_steps")
        self.sampler, self.rank, self.accum = sampler, int(rank), int(accum_steps)
        self.start, self.end = int(start_step), int(end_step)

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, perm = None, None
        for step in range(self.start, self.end):
            if self.sampler.epoch_of(step) != epoch:
                epoch = self.sampler.epoch_of(step)
                perm = self.sampler.permutation(epoch)
            for micro in range(self.accum):
                shard = self.rank * self.accum + micro
                yield [(e, i, step, shard) for e, i in self.sampler.shard(step, shard, perm)]
