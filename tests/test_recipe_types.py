"""The resolved recipe is a tree of typed, frozen sections whose defaults come from the schema."""
import dataclasses
import json

import pytest

from scott.config import SCHEMA, RecipeError, as_section, format_recipe, resolve_recipe
from scott.recipe import ModelConfig, Recipe, SECTION_TYPES


def _recipe(**sections):
    return resolve_recipe(sections, source="<t>", check_data=False, name="t")


def test_sections_are_typed_frozen_and_read_as_mappings():
    r = _recipe(model={"img_size": 32, "patch_size": 4, "tokenizer": "small"})
    assert isinstance(r, Recipe) and isinstance(r.model, ModelConfig)
    assert r.model.img_size == r["model"]["img_size"] == 32
    assert r.name == r["name"] == "t"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.model.img_size = 64
    with pytest.raises(TypeError):
        r["model"]["img_size"] = 64
    with pytest.raises(KeyError, match="model.nope"):
        r.model["nope"]
    assert list(r.model) == list(SCHEMA["model"]) and len(r.model) == len(SCHEMA["model"])
    assert ModelConfig.__annotations__["img_size"] is int


def test_every_default_is_the_schema_default():
    r = _recipe()
    for section, fields in SCHEMA.items():
        for key, spec in fields.items():
            if (section, key) not in (("model", "predictor_dim"), ("data", "eval_split")):  # null: resolved
                assert r[section][key] == spec.default, f"{section}.{key}"
        assert SECTION_TYPES[section]() == {k: f.default for k, f in fields.items()}
    assert r.model.predictor_dim == r.model.embed_dim and r.data.eval_split == "test"
    assert as_section("data", {"name": "folder"}).eval_split == "val"


def test_plain_data_round_trips_and_compares_equal():
    r = _recipe(optim={"lr": 1e-3})
    plain = r.to_dict()
    assert json.loads(json.dumps(plain)) == plain == r
    assert r.model == dict(r.model) and dict(r.model) == r.model
    again = resolve_recipe(plain, source="<t>", check_data=False)
    assert again == r
    assert format_recipe(r) == format_recipe(again)


def test_with_overrides_reruns_every_check():
    r = _recipe()
    changed = r.with_overrides(["optim.lr=2e-3", "train.max_steps=5"])
    assert (changed.optim.lr, changed.train.max_steps) == (2e-3, 5) and r.optim.lr == 5e-4
    with pytest.raises(RecipeError, match="optim.lr: peak lr 1e-07 is below optim.start_lr"):
        r.with_overrides(["optim.lr=1e-7"])
    with pytest.raises(RecipeError, match="did you mean 'lr'"):
        r.with_overrides(["optim.lrr=1"])


def test_as_section_completes_partial_mappings_from_the_schema():
    m = as_section("model", {"img_size": 16, "patch_size": 4, "tokenizer": "small", "size": "tiny"})
    assert (m.embed_dim, m.depth, m.num_heads) == (192, 12, 3)  # the size preset
    assert m.predictor_dim == 192 and m.backend == SCHEMA["model"]["backend"].default
    assert as_section("model", m) is m
    with pytest.raises(RecipeError, match=r"<here>: model.embed_dim: 30 is not divisible by model.num_heads 4"):
        as_section("model", {"embed_dim": 30, "num_heads": 4}, source="<here>")
    with pytest.raises(RecipeError, match="unknown key 'model.img'"):
        as_section("model", {"img": 3})
    with pytest.raises(TypeError):
        as_section("model", [1, 2])
