"""Tiny recipes and a stand-in pretraining dataset shared by the training tests."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from scott.config import resolve_recipe
from scott.data import eval_transform_spec
from scott.masks import build_mask_generator, masks_for_step
from scott.objectives import build_objective
from scott.train import Components

TINY = {
    "data": {"name": "demo", "num_workers": 0, "augment": "none"},
    "model": {"tokenizer": "small", "backend": "dense", "img_size": 16, "patch_size": 4, "in_chans": 1,
              "embed_dim": 32, "depth": 1, "num_heads": 2, "hidden_dim": 8, "predictor_depth": 1,
              "context_tokens": "visible"},
    "mask": {"kind": "blockwise", "ratio": 0.5, "min_block": 2},
    "optim": {"lr": 1e-3, "start_lr": 1e-4, "min_lr": 1e-5, "warmup_epochs": 1, "batch_size": 8,
              "weight_decay": 0.04, "weight_decay_end": 0.1},
    "train": {"max_steps": 6, "seed": 3, "checkpoint_every": 3, "keep_checkpoints": 5, "log_every": 2},
}


def tiny_recipe(**sections) -> dict:
    """The tiny recipe with ``section={key: value}`` updates, validated by scott.config."""
    raw = copy.deepcopy(TINY)
    for section, body in sections.items():
        raw.setdefault(section, {}).update(body)
    return resolve_recipe(raw, source="<tiny>", check_data=False, name="tiny")


class TinyViews(torch.utils.data.Dataset):
    """``dataset[(epoch, index)] -> (context view, target view)``, seeded like PretrainDataset."""

    def __init__(self, n: int = 32, size: int = 16, seed: int = 0, dtype=torch.float32):
        self.base = torch.from_numpy(np.random.default_rng(1234).random((n, 1, size, size))).to(dtype)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 10_007 + index)
        image = self.base[index]
        if torch.rand((), generator=g) < 0.5:
            image = image.flip(-1)
        return image + 0.05 * torch.randn(image.shape, generator=g), image


def tiny_components(recipe: dict, n: int = 32, dtype=torch.float32):
    """Components with the real objective and masks and the TinyViews stand-in data."""
    model = recipe["model"]
    grid = (model["img_size"] // model["patch_size"],) * 2
    gen = build_mask_generator(recipe["mask"], grid)
    return Components(objective=build_objective(recipe).to(dtype),
                      dataset=TinyViews(n, model["img_size"], dtype=dtype),
                      num_samples=n, mask_fn=lambda b, seed, step, shard: masks_for_step(
                          gen, b * recipe["objective"]["num_masks"], seed, step, shard),
                      eval_transform_spec=eval_transform_spec(model))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run a test module's tests with 1 torch thread (exact, comparable runs); import it to use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
