"""kNN on the recipe's own data during and after pretraining: the online monitor (validation
split) and the end-of-run report against a random-init encoder and raw pixels."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

__all__ = ["knn_sets", "knn_monitor", "compare_with_random_init"]


def knn_sets(recipe: Mapping, query_split: str = "val"):
    """(memory bank, queries) labelled datasets for kNN, by the one rule of
    :func:`scott.data.eval_splits.bank_and_queries`: ``"val"`` is the official validation split
    against ``train`` where there is one, else carved from ``trainval`` with
    ``data.val_fraction`` (seed ``train.seed``) against the rest; ``"test"`` is queried against
    ``trainval``. The bank never holds a query image.
    """
    from scott.data.eval_splits import bank_and_queries

    return bank_and_queries(recipe["data"], query_split, int(recipe["train"]["seed"]),
                            in_chans=recipe["model"]["in_chans"])


def knn_monitor(encoder: nn.Module, recipe: Mapping, eval_transform_spec: Mapping | None,
                k: int | None = None, query_split: str = "val", device=None, sets=None) -> float:
    """Weighted-kNN top-1 of ``encoder`` features pooled by its ``global_pool`` (train bank,
    ``query_split`` queries); images go through ``eval_transform_spec`` (``None``: the
    encoder's own).

    Used online during pretraining (``train.monitor_every``) with the validation split, so the
    monitor never looks at the test split. ``sets`` reuses ``knn_sets`` output.
    """
    from scott.eval.features import extract_features
    from scott.eval.knn import knn_classify

    bank, query = sets or knn_sets(recipe, query_split)
    xb, yb = extract_features(encoder, bank, device=device, progress=False, transform_spec=eval_transform_spec)
    xq, yq = extract_features(encoder, query, device=device, progress=False, transform_spec=eval_transform_spec)
    top1, _ = knn_classify(xb, yb, xq, yq, k=int(k or recipe["train"]["monitor_k"]))
    return float(top1)


def compare_with_random_init(run_dir: str | Path, recipe: Mapping, k: int | None = None,
                             split: str | None = None, device=None) -> dict[str, float]:
    """kNN top-1 on ``split`` (default ``data.eval_split``) of the pretrained target encoder, the
    pretrained context encoder and a randomly initialised encoder of the same recipe (seed
    ``train.seed``).

    Both pretrained encoders are reported because on short runs the EMA target still lags the
    context encoder (see :func:`scott.schedules.ema_initial_share`). This is a report of a
    finished run (nothing is selected on it).
    """
    from scott.eval.features import PixelEncoder, load_encoder
    from scott.models import build_encoder

    split = split or recipe["data"]["eval_split"]
    trained = load_encoder(run_dir, which="target", device=device)
    context = load_encoder(run_dir, which="context", device=device)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(int(recipe["train"]["seed"]))
        random_init = build_encoder(recipe["model"])
    spec = trained.eval_transform_spec
    k = int(k or recipe["train"]["monitor_k"])
    sets = knn_sets(recipe, split)
    pixels = PixelEncoder(int(recipe["model"]["in_chans"]), spec)
    return {"pretrained": knn_monitor(trained, recipe, spec, k, split, device, sets),
            "pretrained_context": knn_monitor(context, recipe, spec, k, split, device, sets),
            "random_init": knn_monitor(random_init, recipe, spec, k, split, device, sets),
            "pixels": knn_monitor(pixels, recipe, spec, k, split, device, sets),
            "pool": getattr(trained, "global_pool", "avg"), "k": k, "split": split}
