"""Bank and queries for evaluation split S: the one rule every kNN / probe caller uses.

=============================  ==============================  ===============================
``split``                      bank (labelled, may be fit on)  queries (scored)
=============================  ==============================  ===============================
``test``                       ``trainval`` (every labelled    ``test``
                               non-test image)
``val``, official val split    ``train``                       ``val``
(flowers, imagefolder)
``val``, no official val       ``trainval`` minus the carve-out  carved from ``trainval`` with
                                                               ``data.val_fraction`` (stratified,
                                                               seeded, :func:`split_train_val`)
=============================  ==============================  ===============================

So the bank never holds a query image, and the test split is only ever queried. Pretraining
reads :func:`scott.data.datasets.pretrain_split` (never test unless ``data.transductive``).
:func:`eval_plan` states the rule in terms of stored splits, without touching data.
"""

from __future__ import annotations

from dataclasses import dataclass

from scott.data.datasets import DatasetError, LabeledSubset, build_dataset, has_labels, split_train_val
from scott.data.roots import SPLITS

__all__ = ["EvalPlan", "eval_plan", "bank_and_queries", "bank_only"]


@dataclass(frozen=True)
class EvalPlan:
    """Which dataset splits make the bank and the queries of an evaluation split."""

    bank: str      # split passed to build_dataset for the bank
    queries: str   # split passed to build_dataset for the queries (== bank when carved)
    carved: bool   # queries are a stratified carve-out of the bank split, removed from the bank


def eval_plan(name: str, split: str) -> EvalPlan:
    """The rule for dataset ``name`` and evaluation split ``split`` ("test" or "val")."""
    splits = SPLITS[name]
    if split == "test":
        if "test" not in splits:
            raise DatasetError(f"data.eval_split: '{name}' has no test split; use eval_split: val")
        return EvalPlan("trainval", "test", False)
    if split == "val":
        if "val" in splits:
            return EvalPlan("train", "val", False)
        return EvalPlan("trainval", "trainval", True)
    raise DatasetError(f"data.eval_split: no evaluation split '{split}' (expected 'test' or 'val')")


def _labelled_bank(data_cfg: dict, plan: EvalPlan, in_chans: int | None):
    bank = build_dataset(data_cfg, plan.bank, in_chans=in_chans)
    if not has_labels(bank):
        raise DatasetError(f"data.root: {bank.description} has no labels; kNN and probes need class folders "
                           "(root/<class>/<image>, at least two); pretraining needs none")
    return bank


def bank_and_queries(data_cfg: dict, split: str, seed: int, in_chans: int | None = None):
    """(bank, queries) labelled datasets of ``split`` for the recipe's ``data`` section.

    ``seed`` and ``data.val_fraction`` choose the carve-out where the dataset has no official
    validation split.
    """
    plan = eval_plan(data_cfg["name"], split)
    bank = _labelled_bank(data_cfg, plan, in_chans)
    if not plan.carved:
        return bank, build_dataset(data_cfg, plan.queries, in_chans=in_chans)
    fit, val = split_train_val(bank.labels, float(data_cfg["val_fraction"]), int(seed))
    return (LabeledSubset(bank, fit, description=f"{plan.bank} (fit part)"),
            LabeledSubset(bank, val, description=f"val (carved from {plan.bank}, seed {seed})"))


def bank_only(data_cfg: dict, split: str, seed: int, in_chans: int | None = None):
    """The bank of :func:`bank_and_queries` (the same images), without building the queries'
    split: for work that must never read the test split (choosing hyper-parameters)."""
    plan = eval_plan(data_cfg["name"], split)
    bank = _labelled_bank(data_cfg, plan, in_chans)
    if not plan.carved:
        return bank
    fit, _ = split_train_val(bank.labels, float(data_cfg["val_fraction"]), int(seed))
    return LabeledSubset(bank, fit, description=f"{plan.bank} (fit part)")
