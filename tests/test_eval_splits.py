"""One rule for the kNN bank and queries of each evaluation split; test images stay out of
banks and out of pretraining."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from scott.config import resolve_recipe
from scott.data.datasets import LabeledConcat, LabeledSubset, build_dataset, pretrain_split
from scott.data.eval_splits import bank_and_queries, eval_plan
from scott.data.roots import SPLITS
from scott.train import knn_sets

DATASETS = sorted(SPLITS)


def stored(name: str, split: str) -> set[str]:
    return set(SPLITS[name][split])


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("split", ["test", "val"])
def test_no_query_split_is_in_its_bank(name, split):
    if "test" not in SPLITS[name] and split == "test":  # your own folder: evaluation carves val
        with pytest.raises(ValueError, match="has no test split"):
            eval_plan(name, split)
        return
    plan = eval_plan(name, split)
    if plan.carved:  # the carve-out is removed from the bank (checked on real data below)
        assert plan.bank == plan.queries and "val" not in SPLITS[name]
    else:
        assert not stored(name, plan.bank) & stored(name, plan.queries)
    if "test" in SPLITS[name]:
        assert not stored(name, plan.bank) & stored(name, "test")  # test images are only ever queried


@pytest.mark.parametrize("name", [n for n in DATASETS if "test" in SPLITS[n]])
def test_no_test_image_in_pretraining_unless_transductive(name, caplog):
    parts = set().union(*(stored(name, s) for s in pretrain_split({"name": name})))
    assert not parts & stored(name, "test")
    transductive = set().union(*(stored(name, s) for s in pretrain_split({"name": name, "transductive": True})))
    assert stored(name, "test") <= transductive and "TRANSDUCTIVE" in caplog.text


def identities(dataset) -> set:
    """(stored part, index) of every item, through subsets and concatenations."""
    if isinstance(dataset, LabeledSubset):
        inner = sorted(identities(dataset.base))
        return {inner[i] for i in dataset.indices}
    if isinstance(dataset, LabeledConcat):
        out = set()
        for k, part in enumerate(dataset.parts):
            out |= {(k,) + item for item in identities(part)}
        return out
    if hasattr(dataset, "paths"):
        return {(str(p),) for p in dataset.paths}
    return {(dataset.description, i) for i in range(len(dataset))}


def test_demo_val_is_carved_from_the_bank_and_test_is_separate():
    cfg = {"name": "demo", "val_fraction": 0.1}
    bank, queries = bank_and_queries(cfg, "val", seed=3)
    assert len(bank) == 4500 and len(queries) == 500
    assert not identities(bank) & identities(queries)
    assert identities(bank) | identities(queries) == identities(build_dataset(cfg, "trainval"))
    bank, queries = bank_and_queries(cfg, "test", seed=3)
    assert (len(bank), len(queries)) == (5000, 1000) and queries.description == "demo test"


def _folder(root, splits=("train", "val", "test"), per_class=3):
    for s, split in enumerate(splits):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), 10 * s + i, np.uint8)).save(buf, "PNG")
                (root / split / c / f"{i}.png").write_bytes(buf.getvalue())
    return root


@pytest.mark.parametrize("split", ["val", "test"])
def test_imagefolder_bank_never_holds_a_query(tmp_path, split):
    cfg = {"name": "imagefolder", "root": str(_folder(tmp_path)), "val_fraction": 0.5}
    bank, queries = bank_and_queries(cfg, split, seed=0)
    assert len(bank) == 6 and len(queries) == 6
    assert not {p for p in bank.paths} & {p for p in queries.paths}
    assert all(f"/{split}/" in str(p) for p in queries.paths) and all("/train/" in str(p) for p in bank.paths)


@pytest.mark.parametrize("split", ["val", "test"])
def test_pretrain_report_uses_the_same_rule(split):
    recipe = resolve_recipe({"data": {"name": "demo"}, "model": {"tokenizer": "small", "img_size": 28,
                                                                  "patch_size": 4, "in_chans": 1},
                             "mask": {"min_block": 4}, "train": {"seed": 5}}, check_data=False)
    a_bank, a_queries = knn_sets(recipe, split)
    b_bank, b_queries = bank_and_queries(recipe["data"], split, seed=5, in_chans=1)
    assert identities(a_bank) == identities(b_bank) and identities(a_queries) == identities(b_queries)
    np.testing.assert_array_equal(a_queries.labels, b_queries.labels)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_tools_use_the_same_rule(tmp_path, split):
    from scott.eval.runs import eval_datasets

    recipe = resolve_recipe({"data": {"name": "imagefolder", "root": str(_folder(tmp_path)), "eval_split": split},
                             "model": {"tokenizer": "small", "img_size": 28, "patch_size": 4, "in_chans": 3},
                             "mask": {"min_block": 4}}, check_data=False)
    bank, queries = eval_datasets(recipe)
    assert not {p for p in bank.paths} & {p for p in queries.paths}   # the val queries are not in the bank
    assert all(f"/{split}/" in str(p) for p in queries.paths) and all("/train/" in str(p) for p in bank.paths)


@pytest.mark.parametrize("split", ["val", "test"])
def test_bank_only_is_the_bank_and_never_builds_the_queries_split(tmp_path, split, monkeypatch):
    import scott.data.eval_splits as es

    cfg = {"name": "imagefolder", "root": str(_folder(tmp_path)), "val_fraction": 0.5}
    bank, queries = bank_and_queries(cfg, split, seed=0)
    built = []
    real = es.build_dataset
    monkeypatch.setattr(es, "build_dataset", lambda c, s, **kw: built.append(s) or real(c, s, **kw))
    only = es.bank_only(cfg, split, seed=0)
    assert built == [eval_plan("imagefolder", split).bank] and split not in built
    assert [str(p) for p in only.paths] == [str(p) for p in bank.paths]


def test_bank_only_of_a_carved_split_is_the_fit_part():
    from scott.data.eval_splits import bank_only

    cfg = {"name": "demo", "val_fraction": 0.1}
    bank, queries = bank_and_queries(cfg, "val", seed=3)
    only = bank_only(cfg, "val", seed=3)
    assert identities(only) == identities(bank) and len(only) == 4500
    assert not identities(only) & identities(queries)
    assert len(bank_only(cfg, "test", seed=3)) == 5000
