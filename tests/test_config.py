"""Recipe loading and validation (scott.config)."""

from pathlib import Path

import pytest
import yaml

from scott.config import (
    SIZE_PRESETS,
    RecipeError,
    default_recipe,
    format_recipe,
    load_recipe,
    parse_override,
)
from scott.cli import run_cli

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=(), **kwargs) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides, **kwargs)
    return str(info.value)


# --- shipped recipes -----------------------------------------------------------------------


SHIPPED = ["demo", "fashion_mnist", "fashion_mnist_cpu", "flowers", "folder", "folder_cpu", "pets", "imagenet100"]


@pytest.mark.parametrize("stem", SHIPPED)
def test_shipped_recipes_load(stem):
    recipe = load_recipe(RECIPES / f"{stem}.yaml", check_data=False)
    assert recipe["name"] == stem
    model = recipe["model"]
    assert model["img_size"] % model["patch_size"] == 0
    assert model["embed_dim"] % model["num_heads"] == 0


def test_every_recipe_file_is_covered():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(SHIPPED)


def test_demo_recipe_loads_with_data_check():
    recipe = load_recipe(RECIPES / "demo.yaml")
    assert recipe["data"]["name"] == "demo"
    assert (recipe["model"]["img_size"], recipe["model"]["patch_size"]) == (28, 4)


def test_imagenet100_paper_settings():
    recipe = load_recipe(RECIPES / "imagenet100.yaml", check_data=False)
    m, o, mask = recipe["model"], recipe["optim"], recipe["mask"]
    assert (m["img_size"], m["tokenizer"], m["embed_dim"], m["depth"], m["num_heads"]) == (224, "scott", 384, 12, 6)
    assert (o["batch_size"], o["lr"], o["warmup_epochs"], recipe["train"]["epochs"]) == (64, 5e-4, 40.0, 300)
    assert (mask["kind"], mask["ratio"]) == ("blockwise", 0.6)
    assert recipe["data"]["transductive"] is False


# --- defaults, presets, overrides, round trip ------------------------------------------------


def test_defaults_filled_and_name_is_stem(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  name: demo\n", "my_run.yaml"))
    expected = default_recipe()
    expected["data"]["eval_split"] = "test"  # null resolves to the dataset's test split
    assert recipe["name"] == "my_run"
    for section in ("data", "mask", "objective", "optim", "train"):
        assert recipe[section] == expected[section]
    assert recipe["model"]["predictor_dim"] == recipe["model"]["embed_dim"] == 384
    assert recipe["optim"]["betas"] == [0.9, 0.999]


def test_int_accepted_for_float_and_scientific_string(tmp_path):
    recipe = load_recipe(write(tmp_path, "optim:\n  lr: 1\n  min_lr: 5e-6\n"))
    assert recipe["optim"]["lr"] == 1.0 and isinstance(recipe["optim"]["lr"], float)
    assert recipe["optim"]["min_lr"] == pytest.approx(5e-6)


@pytest.mark.parametrize("size", sorted(SIZE_PRESETS))
def test_size_preset_fills_dims(tmp_path, size):
    recipe = load_recipe(write(tmp_path, f"model:\n  size: {size}\n"))
    m = recipe["model"]
    assert (m["embed_dim"], m["depth"], m["num_heads"]) == SIZE_PRESETS[size]
    assert m["predictor_dim"] == m["embed_dim"]


def test_size_preset_keeps_explicit_values(tmp_path):
    recipe = load_recipe(write(tmp_path, "model:\n  size: base\n  depth: 4\n"))
    assert (recipe["model"]["embed_dim"], recipe["model"]["depth"], recipe["model"]["num_heads"]) == (768, 4, 12)
    recipe = load_recipe(write(tmp_path, "model:\n  size: base\n"), ["model.embed_dim=192"])
    assert (recipe["model"]["embed_dim"], recipe["model"]["num_heads"]) == (192, 12)


def test_overrides_apply(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.001\n")
    recipe = load_recipe(path, ["optim.lr=2e-3", "train.epochs=7", "data.crop_scale=[0.5, 1]",
                                "model.size=cpu", "train.output_dir=runs/x", "optim.grad_clip=null"])
    assert recipe["optim"]["lr"] == pytest.approx(2e-3)
    assert recipe["train"]["epochs"] == 7
    assert recipe["data"]["crop_scale"] == [0.5, 1.0]
    assert recipe["model"]["embed_dim"] == 192 and recipe["model"]["depth"] == 6
    assert recipe["train"]["output_dir"] == "runs/x"
    assert recipe["optim"]["grad_clip"] is None


def test_parse_override_values():
    assert parse_override("mask.ratio=0.75") == ("mask", "ratio", 0.75)
    assert parse_override("data.download=true") == ("data", "download", True)
    assert parse_override("model.tokenizer= small ") == ("model", "tokenizer", "small")


@pytest.mark.parametrize("stem", ["demo", "fashion_mnist", "flowers"])
def test_format_recipe_round_trip(tmp_path, stem):
    # formatting only: no data on disk needed (the data check has its own tests)
    recipe = load_recipe(RECIPES / f"{stem}.yaml", ["optim.lr=3e-4"], check_data=False)
    text = format_recipe(recipe)
    assert yaml.safe_load(text)["optim"]["lr"] == pytest.approx(3e-4)
    again = load_recipe(write(tmp_path, text, "recipe.yaml"), check_data=False)
    assert again == recipe  # name kept from the file's top-level 'name'


# --- errors name the file and the key -------------------------------------------------------


def test_unknown_key_suggests(tmp_path):
    path = write(tmp_path, "model:\n  embed_dimm: 192\n")
    msg = error_of(path)
    assert str(path) in msg and "model.embed_dimm" in msg and "did you mean 'embed_dim'?" in msg


def test_unknown_section_suggests(tmp_path):
    path = write(tmp_path, "modle:\n  depth: 4\n")
    msg = error_of(path)
    assert str(path) in msg and "'modle'" in msg and "did you mean 'model'?" in msg


def test_wrong_type_message(tmp_path):
    path = write(tmp_path, "model:\n  embed_dim: abc\n")
    msg = error_of(path)
    assert str(path) in msg and "model.embed_dim: expected int, got str 'abc'" in msg


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("model:\n  depth: true\n", "model.depth", "expected int, got bool True"),
        ("model:\n  depth: 4.0\n", "model.depth", "expected int, got float 4.0"),
        ("data:\n  download: 'yes'\n", "data.download", "expected bool"),
        ("optim:\n  lr: fast\n", "optim.lr", "expected float, got str 'fast'"),
        ("data:\n  crop_scale: 0.5\n", "data.crop_scale", "expected a list of two floats"),
        ("model:\n  tokenizer: 3\n", "model.tokenizer", "expected a stack name"),
        ("data:\n  root: null\n  name: null\n", "data.name", "must not be null"),
        ("data: [1, 2]\n", "data", "expected a mapping"),
    ],
)
def test_wrong_types(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    msg = error_of(path)
    assert str(path) in msg and key in msg and fragment in msg


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("mask:\n  ratio: 1.0\n", "mask.ratio", "must be in (0, 1), got 1.0"),
        ("mask:\n  ratio: 0\n", "mask.ratio", "must be in (0, 1)"),
        ("data:\n  val_fraction: 1.5\n", "data.val_fraction", "must be in (0, 1)"),
        ("optim:\n  batch_size: 0\n", "optim.batch_size", "must be >= 1, got 0"),
        ("model:\n  depth: -2\n", "model.depth", "must be >= 0, got -2"),
        ("optim:\n  lr: 0\n", "optim.lr", "must be > 0"),
        ("data:\n  crop_scale: [0.9, 0.2]\n", "data.crop_scale", "first value must be <= second"),
        ("data:\n  crop_scale: [0.2, 1.5]\n", "data.crop_scale", "must be in (0, 1]"),
        ("data:\n  augment: strong\n", "data.augment", "expected one of 'paper', 'light', 'none'"),
        ("data:\n  name: flower\n", "data.name", "did you mean 'flowers'?"),
        ("model:\n  in_chans: 2\n", "model.in_chans", "expected one of 1, 3"),
        ("train:\n  mixed_precision: fp8\n", "train.mixed_precision", "expected one of"),
    ],
)
def test_out_of_range(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    msg = error_of(path)
    assert str(path) in msg and key in msg and fragment in msg


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("model:\n  tokenizer: patchify\n  img_size: 30\n  patch_size: 4\n", "model.img_size", "not divisible"),
        ("model:\n  embed_dim: 100\n  num_heads: 3\n", "model.embed_dim", "not divisible"),
        ("model:\n  predictor_dim: 90\n  num_heads: 4\n  embed_dim: 128\n", "model.predictor_dim", "not divisible"),
        ("model:\n  tokenizer: scott\n  patch_size: 8\n", "model.patch_size", "'scott'"),
        ("model:\n  embed_dim: 130\n  num_heads: 2\n  predictor_dim: 128\n", "model.embed_dim", "sin-cos"),
        ("model:\n  predictor_dim: 6\n  num_heads: 2\n  embed_dim: 128\n", "model.predictor_dim", "sin-cos"),
        ("model:\n  tokenizer: patchify\n  img_size: 32\n  patch_size: 16\n", "mask.min_block", "4 patches"),
        ("objective:\n  ema_start: 1.0\n  ema_end: 0.99\n", "objective.ema_start", "larger"),
        ("optim:\n  batch_size: 10\n  accum_steps: 3\n", "optim.batch_size", "accum_steps"),
        ("model:\n  img_size: 28\n  patch_size: 4\n  tokenizer: patchify\nobjective:\n  target_shift: 14\n", "objective.target_shift", "half"),
        ("objective:\n  name: pixel\n  target_shift: 2\n", "objective.target_shift", "pixel"),
        ("objective:\n  target_shift: -1\n", "objective.target_shift", "must be >= 0"),
    ],
)
def test_cross_field_checks(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    msg = error_of(path)
    assert str(path) in msg and key in msg and fragment in msg


def test_malformed_yaml_names_line(tmp_path):
    path = write(tmp_path, "model:\n  depth: 4\n  embed_dim: [1, 2\n")
    msg = error_of(path)
    assert str(path) in msg and "malformed YAML" in msg and "line 4" in msg


def test_malformed_yaml_bad_indent(tmp_path):
    path = write(tmp_path, "model:\n  depth: 4\n   heads: 3\n")
    msg = error_of(path)
    assert str(path) in msg and "line 3" in msg


def test_empty_file(tmp_path):
    path = write(tmp_path, "# only a comment\n")
    msg = error_of(path)
    assert str(path) in msg and "empty" in msg


def test_missing_file(tmp_path):
    msg = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


def test_top_level_not_mapping(tmp_path):
    path = write(tmp_path, "- data\n- model\n")
    assert "top level must be a mapping" in error_of(path)


def test_missing_imagefolder_root(tmp_path):
    missing = tmp_path / "no_such_folder"
    path = write(tmp_path, f"data:\n  name: imagefolder\n  root: {missing}\n")
    msg = error_of(path)
    assert str(path) in msg and "data.root" in msg and str(missing) in msg and "does not exist" in msg
    assert load_recipe(path, check_data=False)["data"]["root"] == str(missing)


def test_imagefolder_requires_root(tmp_path):
    msg = error_of(write(tmp_path, "data:\n  name: imagefolder\n"))
    assert "data.root" in msg and "required" in msg


def test_imagefolder_root_without_train(tmp_path):
    (tmp_path / "imgs").mkdir()
    msg = error_of(write(tmp_path, f"data:\n  name: imagefolder\n  root: {tmp_path / 'imgs'}\n"))
    assert "data.root" in msg and "'train'" in msg


def test_missing_fashion_mnist_root(tmp_path):
    empty = tmp_path / "fm"
    empty.mkdir()
    path = write(tmp_path, f"data:\n  name: fashion_mnist\n  root: {empty}\n")
    msg = error_of(path)
    assert str(path) in msg and "data.root" in msg and "train-images-idx3-ubyte" in msg
    # with download the folder is created by torchvision later: no error at load time
    assert load_recipe(path, ["data.download=true"])["data"]["download"] is True


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=0.1", "did you mean 'lr'?"),
        ("optimm.lr=0.1", "did you mean 'optim'?"),
        ("optim.lr", "expected 'section.key=value'"),
        ("lr=0.1", "must be 'section.key'"),
        ("model.depth=four", "model.depth: expected int, got str 'four'"),
        ("model.depth=[1, 2", "cannot parse value"),
        ("mask.ratio=2", "must be in (0, 1)"),
    ],
)
def test_bad_override(tmp_path, override, fragment):
    path = write(tmp_path, "optim:\n  lr: 0.001\n")
    msg = error_of(path, [override])
    assert str(path) in msg and override in msg and fragment in msg


def test_run_cli_exits_2_with_message(tmp_path, capsys):
    path = write(tmp_path, "model:\n  depht: 3\n")
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: load_recipe(path))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.depht" in err and "did you mean 'depth'?" in err


def test_run_cli_passes_status():
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: None)
    assert info.value.code == 0


def test_override_replaces_bad_file_value(tmp_path):
    path = write(tmp_path, "mask:\n  ratio: 1.2\n")
    assert "mask.ratio" in error_of(path)
    assert load_recipe(path, ["mask.ratio=0.5"])["mask"]["ratio"] == 0.5
