"""Supervised training from scratch: the baseline every self-supervised number must beat.

The same encoder as the recipe, at random init, with an avg-pool + LayerNorm + Linear head
(``FinetuneClassifier``), trained on labelled images seen through the recipe's own pretraining
augmentation (the context view of its two-view transform: crop, flip, colour block), validated
on the carved validation split, test evaluated once (``scott.eval.finetune.finetune``).

Public API:
    AugmentedLabels(dataset, two_view_transform, seed)   (augmented view, label), new draw per visit
    training_views(fit, recipe, view, augment, seed)     a fine-tune's training set: the recipe's
                                                         views or flipped evaluation views
    supervised_from_scratch(recipe, fit, val, test, epochs, ...) -> finetune result dict
    seconds_per_step(model, batch, ...)                  timing used to fit an epoch count to a budget
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from scott.data.transforms import build_pretrain_transform, view_seed
from scott.eval.finetune import FinetuneClassifier, FlipView, finetune, seeded_init
from scott.optim_groups import adamw

__all__ = ["AugmentedLabels", "training_views", "supervised_from_scratch", "seconds_per_step", "build_classifier"]


class AugmentedLabels(torch.utils.data.Dataset):
    """``(augmented view, label)`` of a labelled PIL dataset; visit ``v`` of item ``i`` draws its
    view from ``(seed, v, i)``, so each epoch sees new augmentations and a run is reproducible
    (single-process loading)."""

    def __init__(self, dataset, two_view_transform, seed: int = 0):
        self.dataset, self.transform, self.seed = dataset, two_view_transform, int(seed)
        self.visits = [0] * len(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        visit = self.visits[index]
        self.visits[index] += 1
        image, label = self.dataset[index]
        g = torch.Generator().manual_seed(view_seed(self.seed, visit, index))
        context = self.transform(image, g)[0]  # the context view: the recipe's augmentation
        return context, int(label)


def training_views(fit, recipe: dict, view, augment: str = "flip", seed: int = 0, flip: bool = True):
    """The training set of a fine-tune on ``fit`` (labelled PIL items): ``augment`` "recipe" is
    the recipe's pretraining views (:class:`AugmentedLabels`, what the supervised row trains on);
    "flip" is ``view(fit)`` (the evaluation transform) with random horizontal flips unless
    ``flip`` is False."""
    if augment == "recipe":
        return AugmentedLabels(fit, build_pretrain_transform(recipe), seed)
    if augment != "flip":
        raise ValueError(f"augment must be 'flip' or 'recipe', got {augment!r}")
    return FlipView(view(fit)) if flip else view(fit)


def build_classifier(recipe: dict, num_classes: int, seed: int) -> FinetuneClassifier:
    """A randomly initialised encoder of ``recipe`` (seeded) with a linear head."""
    from scott.models import build_encoder

    with seeded_init(seed):
        return FinetuneClassifier(build_encoder(recipe["model"]), num_classes)


def seconds_per_step(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, steps: int = 5,
                     warmup: int = 2) -> float:
    """Median wall seconds of one AdamW training step of ``model`` on ``batch`` (weights restored)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = adamw(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    model.train()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = loss_fn(model(batch), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    model.load_state_dict(state)
    return sorted(times)[len(times) // 2]


def supervised_from_scratch(recipe: dict, fit, val, test, epochs: int, num_classes: int, seed: int = 0,
                            lr: float = 1e-3, batch_size: int | None = None, log=print) -> dict:
    """Train the recipe's encoder from random init on ``fit`` (PIL, label) with the recipe's
    augmentation; ``val``/``test`` are already-transformed tensor datasets."""
    model = build_classifier(recipe, num_classes, seed)
    augmented = AugmentedLabels(fit, build_pretrain_transform(recipe), seed)
    return finetune(model, augmented, val, test, epochs=int(epochs), lr=lr,
                    batch_size=int(batch_size or recipe["optim"]["batch_size"]), seed=seed, log=log)
