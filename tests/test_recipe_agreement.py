"""The recipe validator agrees with the code and the docs.

Every recipe in recipes/, every result record in docs/results/ and every documented command
with ``--set`` overrides loads (without data on disk); what the validator accepts the code
builds, and what the code rejects the validator rejects first, with a message naming the key.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from scott.config import RecipeError, load_recipe, resolve_recipe
from scott.data.datasets import available_splits, build_dataset
from scott.models import build_encoder
from scott.tokenizer import build_stack

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RECORDS = sorted((ROOT / "docs" / "results").rglob("*.json"))


def model_recipe(**model):
    return resolve_recipe({"model": model}, source="<test>", check_data=False)


def rejection(raw) -> str:
    with pytest.raises(RecipeError) as info:
        resolve_recipe(raw, source="<test>", check_data=False)
    return str(info.value)


# ----------------------------------------------------------------------------- shipped files load
def test_recipes_are_found():
    assert {p.stem for p in RECIPES} >= {"demo", "fashion_mnist", "flowers", "pets", "imagenet100"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_builds(path):
    recipe = load_recipe(path, check_data=False)  # no data on disk needed
    from scott.data.eval_splits import eval_plan

    plan = eval_plan(recipe["data"]["name"], recipe["data"]["eval_split"])  # the split exists or is carved
    assert {plan.bank, plan.queries} <= set(available_splits(recipe["data"]))
    model = recipe["model"]
    stack = build_stack(model["tokenizer"], model["in_chans"], model["embed_dim"], model["patch_size"],
                        model["hidden_dim"])
    assert len(stack) >= 1


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(doc file, recipe path, overrides) of every documented command naming a recipe."""
    found = []
    for doc in DOCS:
        for line in doc.read_text(encoding="utf-8").splitlines():
            for match in re.finditer(r"(recipes/[\w.-]+\.yaml)([^`#|]*)", line):
                try:
                    words = shlex.split(match.group(2))
                except ValueError:
                    continue
                sets = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]
                if all(not s.endswith("...") and "=" in s for s in sets):
                    found.append((doc.name, match.group(1), sets))
    return found


def test_documented_commands_are_found():
    cmds = documented_commands()
    assert any(sets for _, _, sets in cmds)  # README: --set train.epochs=5 --set model.backend=tiles
    assert {Path(r).stem for _, r, _ in cmds} >= {"demo", "flowers"}


@pytest.mark.parametrize("doc, recipe, overrides", documented_commands(),
                         ids=lambda v: v if isinstance(v, str) else ",".join(v) or "-")
def test_every_documented_command_loads(doc, recipe, overrides):
    load_recipe(ROOT / recipe, overrides, check_data=False)


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: str(p.relative_to(ROOT / "docs" / "results")))
def test_every_result_record_recipe_loads(path):
    record = json.loads(path.read_text(encoding="utf-8"))
    if "recipe" not in record:
        pytest.skip("record without a recipe")
    recipe = resolve_recipe(record["recipe"], source=str(path), check_data=False, name="record")
    assert recipe["data"]["name"] == record["data"]


# ----------------------------------------------------------------------------- eval_split
@pytest.mark.parametrize("name", ["demo", "fashion_mnist", "pets", "imagenet100", "flowers", "imagefolder"])
def test_eval_split_val_only_where_the_dataset_has_one(name):
    raw = {"data": {"name": name, "eval_split": "val", "root": "/x"}}
    if "val" in available_splits({"name": name}):
        assert resolve_recipe(raw, check_data=False)["data"]["eval_split"] == "val"
        return
    msg = rejection(raw)
    assert "data.eval_split" in msg and f"'{name}' has no 'val' split" in msg and "eval_split: test" in msg
    # the code agrees: the split really does not exist
    if name == "demo":
        with pytest.raises(RecipeError, match="no split 'val'"):
            build_dataset({"name": "demo"}, "val")


# ----------------------------------------------------------------------------- tokenizer stacks
def test_documented_custom_stack_loads_and_builds():
    text = (ROOT / "docs" / "tokenizer.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| custom |"))
    stack = yaml.safe_load(row.split("`")[1])
    assert "relu" in stack and "maxblurpool" in stack  # strings, as documented
    recipe = model_recipe(tokenizer=stack, img_size=224, patch_size=16, embed_dim=96, num_heads=3, depth=1,
                          predictor_dim=96)
    encoder = build_encoder(recipe["model"])
    tokens = encoder(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 14 * 14, 96)


def test_small_stack_with_patch_16_as_documented():
    recipe = model_recipe(tokenizer="small", img_size=64, patch_size=16, embed_dim=32, num_heads=2, depth=1,
                          predictor_dim=32)
    assert build_encoder(recipe["model"])(torch.randn(2, 3, 64, 64)).shape == (2, 16, 32)


CUSTOM_CASES = [
    # (stack, patch_size): accepted by both or rejected by both
    ([{"conv": {"out": 16, "kernel": 3, "stride": 2}}, "relu", {"conv": {"kernel": 3, "stride": 2}}], 4),
    ([{"conv": {"out": 16, "kernel": 3, "stride": 2}}, "relu", {"conv": {"kernel": 3, "stride": 2}}], 8),
    ([{"conv": {"kernel": 4, "stride": 4, "bias": True}}], 4),
    ([{"conv": {"kernel": 4, "stride": 2}}], 2),
    ([{"conv": {"kernel": 3}}, "maxblurpool", "MaxPool", {"blur": {"stride": 2}}], 4),
    ([{"conv": {"kernel": 3}}, "maxblurpol"], 2),
    ([{"conv": {"kernel": 3}}, {"gelu": None}, "blur"], 2),
    ([{"conv": {"kernel": 3, "padding": 1}}, "blur"], 2),
    (["relu", "maxblurpool", "maxblurpool"], 4),
    ([{"conv": {"kernel": 3, "stride": 2}}, {"conv": {"kernel": 3, "stride": 2}}], 4),
    ([{"conv": {"out": 24, "kernel": 3, "stride": 4}}], 4),
    ([{"conv": {"out": 32, "kernel": 3, "stride": 4}}, 5], 4),
    ([{"pool": {}}], 1),
]


@pytest.mark.parametrize("stack, patch", CUSTOM_CASES, ids=[str(i) for i in range(len(CUSTOM_CASES))])
def test_validator_and_build_stack_agree_on_custom_stacks(stack, patch):
    try:
        build_stack(stack, 3, 32, patch)
        built = True
    except (ValueError, TypeError):
        built = False
    raw = {"model": {"tokenizer": stack, "img_size": 16 * patch, "patch_size": patch, "embed_dim": 32,
                     "num_heads": 2, "predictor_dim": 32}, "mask": {"min_block": 1}}
    try:
        resolve_recipe(raw, source="<test>", check_data=False)
        accepted, msg = True, ""
    except RecipeError as exc:
        accepted, msg = False, str(exc)
    assert accepted == built, msg
    if not accepted:
        assert "model.tokenizer" in msg


def test_custom_stack_messages_name_the_layer():
    base = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "num_heads": 2, "predictor_dim": 32}
    msg = rejection({"model": {**base, "tokenizer": [{"conv": {"kernel": 3}}, "maxblurpol", "maxblurpool"]}})
    assert "model.tokenizer[1]" in msg and "did you mean 'maxblurpool'?" in msg
    msg = rejection({"model": {**base, "tokenizer": [{"conv": {"kernel": 3, "stride": 2}}]}})
    assert "total stride is 2" in msg and "model.patch_size is 4" in msg
