"""Recipe schema, loading, validation and ``--set`` overrides.

This module is the ONE place where recipes are checked and where keys get their defaults
(``SCHEMA``). ``load_recipe`` returns a complete, frozen, typed :class:`scott.recipe.Recipe`
(sections are attribute objects that also read as mappings; see docs/architecture.md,
"Recipe schema"); library builders take a section through :func:`as_section`, so nothing
downstream re-defaults a key.

Rules:

* files are read with ``yaml.safe_load`` only;
* every error is a :class:`RecipeError` whose single-line message names the file and the key
  (unknown keys come with a "did you mean 'x'?" suggestion);
* ints are accepted where floats are expected (and converted); bools are never ints;
  float keys also accept strings in scientific notation such as ``5e-4`` (YAML 1.1 reads
  ``5e-4`` without a dot as a string, a common trap);
* overrides are strings ``"section.key=value"``; the value is parsed with ``yaml.safe_load``;
* ``model.size`` presets fill ``embed_dim``/``depth``/``num_heads`` unless the recipe (or an
  override) sets them explicitly; ``model.predictor_dim: null`` resolves to ``embed_dim``;
* an optional top-level ``name`` sets ``recipe["name"]`` (default: the file stem), so a resolved
  recipe written by :func:`format_recipe` loads back unchanged.

CLIs catch :class:`RecipeError`, print it to stderr and exit with status 2;
:func:`scott.cli.run_cli` does exactly that.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

__all__ = [
    "RecipeError",
    "SIZE_PRESETS",
    "load_recipe",
    "resolve_recipe",
    "default_recipe",
    "format_recipe",
    "parse_override",
    "as_section",
]


class RecipeError(ValueError):
    """A recipe could not be loaded; the message names the file and the offending key."""


# ---------------------------------------------------------------------------------------------
# Schema description
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One recipe key: its kind, default and constraints.

    kind: "int", "float", "bool", "str", "choice", "pair" (two floats), "int_list" (a non-empty
    list of distinct ints), "tokenizer" (a stack name or a list of layer descriptions).
    """

    kind: str
    default: Any
    nullable: bool = False
    choices: tuple = ()
    low: float | None = None  # lower bound
    high: float | None = None  # upper bound
    low_open: bool = False  # True: value must be > low, else >= low
    high_open: bool = False  # True: value must be < high, else <= high
    ordered: bool = False  # pairs: first <= second


def _pos_int(default, nullable=False):
    return Field("int", default, nullable=nullable, low=1)


def _nonneg_int(default):
    return Field("int", default, low=0)


def _nonneg_float(default, nullable=False):
    return Field("float", default, nullable=nullable, low=0.0)


def _pos_float(default, nullable=False):
    return Field("float", default, nullable=nullable, low=0.0, low_open=True)


def _unit_pair(default):
    """A pair (a, b) with 0 < a <= b <= 1."""
    return Field("pair", default, low=0.0, low_open=True, high=1.0, ordered=True)


def _pos_pair(default):
    return Field("pair", default, low=0.0, low_open=True, ordered=True)


DATASET_NAMES = ("demo", "fashion_mnist", "flowers", "pets", "imagenet100", "imagefolder", "folder")
STACK_NAMES = ("scott", "small", "patchify")

SCHEMA: Mapping[str, Mapping[str, Field]] = {
    "data": {
        "name": Field("choice", "demo", choices=DATASET_NAMES),
        "root": Field("str", None, nullable=True),
        "download": Field("bool", False),
        "transductive": Field("bool", False),
        "on_bad_image": Field("choice", "error", choices=("error", "skip")),
        "max_image_pixels": _pos_int(178_956_970, nullable=True),
        "class_folders": Field("bool", True),  # folder: first-level folders are classes (evaluation only)  # width x height; null: no limit
        "num_workers": _nonneg_int(2),
        "augment": Field("choice", "paper", choices=("paper", "light", "none")),
        "crop_scale": _unit_pair([0.2, 1.0]),
        "val_fraction": Field("float", 0.1, low=0.0, high=1.0, low_open=True, high_open=True),
        "eval_split": Field("choice", None, nullable=True, choices=("test", "val")),  # null: test, val for a folder
        "classes": Field("int_list", None, nullable=True, low=0),
        "train_subset": _pos_int(None, nullable=True),
        "subset_seed": _nonneg_int(0),
    },
    "model": {
        "tokenizer": Field("tokenizer", "scott", choices=STACK_NAMES),
        "backend": Field("choice", "auto", choices=("auto", "spconv", "tiles", "dense")),
        "size": Field("choice", None, nullable=True, choices=("cpu", "tiny", "small", "base")),
        "img_size": _pos_int(224),
        "patch_size": _pos_int(16),
        "in_chans": Field("choice", 3, choices=(1, 3)),
        "embed_dim": _pos_int(384),
        "depth": _nonneg_int(12),  # 0: no transformer blocks (the tokenizer alone; an ablation)
        "num_heads": _pos_int(6),
        "mlp_ratio": _pos_float(4.0),
        "hidden_dim": _pos_int(64),
        "token_norm": Field("bool", True),
        "tokenizer_masking": Field("choice", "sparse", choices=("sparse", "leaky")),
        "global_pool": Field("choice", "avg", choices=("avg", "grid2", "grid3", "flat")),
        "context_tokens": Field("choice", "visible", choices=("visible", "all")),
        "predictor_depth": _pos_int(3),
        "predictor_dim": _pos_int(None, nullable=True),
    },
    "mask": {
        "kind": Field("choice", "blockwise", choices=("blockwise", "multiblock", "uniform")),
        "ratio": Field("float", 0.6, low=0.0, high=1.0, low_open=True, high_open=True),
        "min_block": _pos_int(16),
        "aspect": _pos_pair([0.3, 3.3]),
        "num_targets": _pos_int(4),
        "target_scale": _unit_pair([0.15, 0.2]),
        "target_aspect": _pos_pair([0.75, 1.5]),
        "context_scale": _unit_pair([0.85, 1.0]),
    },
    "objective": {
        "name": Field("choice", "mimjepa", choices=("mimjepa", "pixel")),
        "loss": Field("choice", "smooth_l1", choices=("smooth_l1", "l2")),
        "ema_start": Field("float", 0.996, low=0.0, high=1.0),
        "ema_end": Field("float", 1.0, low=0.0, high=1.0),
        "target_view": Field("choice", "jitter", choices=("same", "jitter")),
        "target_shift": _nonneg_int(0),  # pixels: the target view is the context's, translated
        "norm_pix": Field("bool", True),
        "num_masks": _pos_int(1),
        "target_layers": _pos_int(1),
        "global_weight": _nonneg_float(0.0),
        "center_targets": Field("bool", False),
        "target_norm": Field("choice", "layer", choices=("layer", "instance")),
        "global_view": Field("choice", "same", choices=("same", "crop")),
        "dino_weight": _nonneg_float(0.0),
        "var_weight": _nonneg_float(0.0),   # VICReg's variance term on the visible context tokens
        "cov_weight": _nonneg_float(0.0),   # VICReg's covariance term on the same tokens
        # what the two terms centre each token by: the whole batch (VICReg's) or its grid position
        "decorrelation_center": Field("choice", "batch", choices=("batch", "position")),
        "dino_prototypes": _pos_int(256),
        "dino_student_temp": _pos_float(0.1),
        "dino_teacher_temp": _pos_float(0.04),
        "dino_center_momentum": Field("float", 0.9, low=0.0, high=1.0, high_open=True),
    },
    "optim": {
        "lr": _pos_float(5e-4),
        "start_lr": _nonneg_float(1e-6),
        "min_lr": _nonneg_float(1e-5),
        "warmup_epochs": _nonneg_float(40.0),
        "flat_fraction": Field("float", 0.72, low=0.0, high=1.0),
        "weight_decay": _nonneg_float(0.04),
        "weight_decay_end": _nonneg_float(0.4),
        "batch_size": _pos_int(64),
        "accum_steps": _pos_int(1),
        "betas": Field("pair", [0.9, 0.999], low=0.0, high=1.0, high_open=True),
        "grad_clip": _pos_float(None, nullable=True),
    },
    "train": {
        "epochs": _pos_int(300),
        "max_steps": _pos_int(None, nullable=True),
        "seed": _nonneg_int(0),
        "checkpoint_every": _pos_int(500),
        "keep_checkpoints": _pos_int(3),
        "log_every": _pos_int(10),
        "mixed_precision": Field("choice", "no", choices=("no", "fp16", "bf16")),
        "deterministic": Field("bool", False),
        "monitor_every": _nonneg_int(0),
        "monitor_k": _pos_int(20),
        "export_encoder": Field("choice", "target", choices=("target", "context")),
        "output_dir": Field("str", None, nullable=True),
    },
}

#: ``model.size`` presets: (embed_dim, depth, num_heads).
SIZE_PRESETS: Mapping[str, tuple[int, int, int]] = {
    "cpu": (192, 6, 3),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}
_PRESET_KEYS = ("embed_dim", "depth", "num_heads")

#: Patch sizes each named tokenizer stack can produce (docs/architecture.md, "Stacks").
_STACK_PATCH_SIZES: Mapping[str, tuple[int, ...]] = {"scott": (16,), "small": (4, 8, 16)}

#: Custom stacks (docs/tokenizer.md): string layers and their stride; one-key dict layers and
#: their arguments. Mirrors ``scott.tokenizer.layers.stack_from_description`` (a test keeps the
#: two in agreement) so a recipe is checked without importing torch.
_STRING_LAYER_STRIDES: Mapping[str, int] = {"relu": 1, "gelu": 1, "maxpool": 1, "blur": 2, "maxblurpool": 2}
_DICT_LAYER_ARGS: Mapping[str, tuple[str, ...]] = {
    "conv": ("out", "kernel", "stride", "bias"), "blur": ("stride",), "relu": (), "gelu": (),
}

#: Datasets read from a local folder that must exist (no download path).
_LOCAL_ONLY = ("imagefolder", "imagenet100")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def default_recipe() -> dict:
    """A fresh nested dict holding every default (``name`` = "default")."""
    recipe = {sec: {k: copy.deepcopy(f.default) for k, f in fields.items()} for sec, fields in SCHEMA.items()}
    recipe["name"] = "default"
    return recipe


def load_recipe(path, overrides: Iterable[str] = (), check_data: bool = True):
    """Load, validate and complete the recipe at ``path``.

    Args:
        path: YAML file.
        overrides: strings ``"section.key=value"`` applied after the file (value parsed as YAML).
        check_data: also check that local data folders the recipe needs exist (set False to
            inspect a recipe on a machine without its data).

    Returns:
        a frozen :class:`scott.recipe.Recipe` with every default filled and ``recipe.name`` =
        file stem (or the file's top-level ``name``).

    Raises:
        RecipeError: one message naming the file and the key.
    """
    path = Path(path)
    src = str(path)
    if not path.exists():
        raise RecipeError(f"{src}: recipe file not found")
    if not path.is_file():
        raise RecipeError(f"{src}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{src}: cannot read recipe ({exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{src}: {where}malformed YAML ({problem})") from None
    if raw is None:
        raise RecipeError(f"{src}: recipe is empty (expected sections such as 'data:' and 'model:')")
    return resolve_recipe(raw, source=src, overrides=overrides, check_data=check_data, name=path.stem)


def resolve_recipe(
    raw: Any,
    source: str = "<recipe>",
    overrides: Iterable[str] = (),
    check_data: bool = True,
    name: str = "recipe",
):
    """Validate an already parsed recipe mapping (e.g. from a checkpoint) and fill defaults;
    returns a frozen :class:`scott.recipe.Recipe`.

    ``source`` is the label used in error messages; ``name`` is used when ``raw`` has no
    top-level ``name``.
    """
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: top level must be a mapping of sections, got {_describe(raw)}")
    raw = copy.deepcopy(raw)
    recipe = default_recipe()
    recipe["name"] = name
    # (section, key) -> (value, where it came from); overrides replace file values before
    # validation, so an override can fix a bad value in the file.
    entries: dict[tuple[str, str], tuple[Any, str]] = {}
    for section, body in raw.items():
        if section == "name":
            if not isinstance(body, str) or not body:
                raise RecipeError(f"{source}: name: expected a non-empty str, got {_describe(body)}")
            recipe["name"] = body
            continue
        _check_section_name(section, source)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise RecipeError(f"{source}: {section}: expected a mapping of keys, got {_describe(body)}")
        for key, value in body.items():
            _check_key_name(section, key, source)
            entries[(section, key)] = (value, source)
    for text in overrides:
        section, key, value = parse_override(text, source)
        entries[(section, key)] = (value, f"{source}: override '{text}'")

    for (section, key), (value, where) in entries.items():
        recipe[section][key] = _check_value(section, key, value, where)

    _complete_model(recipe["model"], {key for section, key in entries if section == "model"})
    _complete_data(recipe["data"])
    for section in SCHEMA:
        _section_rules(section, recipe[section], source)
    _between_sections_rules(recipe, source)
    if check_data:
        _check_data_folder(recipe, source)
    from scott.recipe import Recipe

    return Recipe.from_resolved(recipe)


def as_section(section: str, body: Mapping, source: str | None = None):
    """The typed ``section`` (e.g. ``"model"``) from a section object or a mapping.

    A mapping may be partial: missing keys take the schema's defaults, every key is checked
    like a recipe's, and the section's own rules apply (the rules between sections need a
    whole recipe: :func:`resolve_recipe`). Library entry points (``build_encoder``,
    ``build_mask_generator``, ...) call this, so they never re-default a key themselves.
    """
    from scott.recipe import SECTION_TYPES

    if section not in SCHEMA:
        raise ValueError(f"unknown recipe section {section!r}")
    cls = SECTION_TYPES[section]
    if isinstance(body, cls):
        return body
    if not isinstance(body, Mapping):
        raise TypeError(f"the {section} section must be a mapping, got {type(body).__name__}")
    source = source or f"<{section} section>"
    values = {k: copy.deepcopy(f.default) for k, f in SCHEMA[section].items()}
    for key, value in body.items():
        values[key] = _check_value(section, key, value, source)
    if section == "model":
        _complete_model(values, set(body))
    if section == "data":
        _complete_data(values)
    _section_rules(section, values, source)
    return cls(**values)


def parse_override(text: str, source: str = "<overrides>") -> tuple[str, str, Any]:
    """Split ``"section.key=value"`` into (section, key, parsed value); value via yaml.safe_load."""
    where = f"{source}: override '{text}'"
    if not isinstance(text, str) or "=" not in text:
        raise RecipeError(f"{where}: expected 'section.key=value'")
    dotted, value_text = text.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise RecipeError(f"{where}: key '{dotted}' must be 'section.key', e.g. 'optim.lr=1e-3'")
    section, key = parts
    _check_section_name(section, where)
    _check_key_name(section, key, where)
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{where}: {dotted}: cannot parse value ({problem})") from None
    return section, key, value


def format_recipe(recipe: Mapping) -> str:
    """YAML text of a (resolved) recipe; ``load_recipe`` of this text gives the same recipe."""
    ordered = {"name": recipe.get("name")} if "name" in recipe else {}
    for section in SCHEMA:
        if section in recipe:
            ordered[section] = dict(recipe[section])
    for key, value in recipe.items():
        if key not in ordered:
            ordered[key] = value
    return yaml.dump(ordered, Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False)


class _RecipeDumper(yaml.SafeDumper):
    """Safe dumper writing mappings as blocks and short lists of scalars inline ([0.2, 1.0])."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = all(isinstance(v, (int, float, str, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)
_RecipeDumper.add_representer(tuple, _represent_list)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _suggest(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_section_name(section: Any, where: str) -> None:
    if section not in SCHEMA:
        known = ", ".join(SCHEMA)
        raise RecipeError(
            f"{where}: unknown section '{section}'{_suggest(section, SCHEMA)} (sections: {known})"
        )


def _check_key_name(section: str, key: Any, where: str) -> None:
    if key not in SCHEMA[section]:
        raise RecipeError(
            f"{where}: unknown key '{section}.{key}'{_suggest(key, SCHEMA[section])}"
            f" (keys of '{section}': {', '.join(SCHEMA[section])})"
        )


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


_SCI_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _as_float(value: Any) -> float | None:
    """Float value of an int/float (or scientific-notation string); None when not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
        return float(value)
    return None


def _check_value(section: str, key: str, value: Any, where: str) -> Any:
    """Validate one value against the schema and return it normalised."""
    _check_key_name(section, key, where)
    spec = SCHEMA[section][key]
    label = f"{where}: {section}.{key}"
    if value is None:
        if spec.nullable:
            return None
        raise RecipeError(f"{label}: must not be null")

    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise RecipeError(f"{label}: expected bool (true/false), got {_describe(value)}")
        return value
    if spec.kind == "str":
        if not isinstance(value, str) or not value:
            raise RecipeError(f"{label}: expected a non-empty str, got {_describe(value)}")
        return value
    if spec.kind == "choice":
        if isinstance(value, bool) or value not in spec.choices:
            options = ", ".join(repr(c) for c in spec.choices)
            hint = _suggest(value, [str(c) for c in spec.choices]) if isinstance(value, str) else ""
            raise RecipeError(f"{label}: expected one of {options}, got {_describe(value)}{hint}")
        return value
    if spec.kind == "tokenizer":
        return _check_tokenizer(value, spec, label)
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{label}: expected int, got {_describe(value)}")
        _check_range(float(value), spec, label)
        return value
    if spec.kind == "float":
        number = _as_float(value)
        if number is None:
            raise RecipeError(f"{label}: expected float, got {_describe(value)}")
        if not math.isfinite(number):
            raise RecipeError(f"{label}: expected a finite float, got {value!r}")
        _check_range(number, spec, label)
        return number
    if spec.kind == "int_list":
        if (not isinstance(value, (list, tuple)) or not value
                or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
            raise RecipeError(f"{label}: expected a non-empty list of ints, got {_describe(value)}")
        for v in value:
            _check_range(float(v), spec, label)
        if len(set(value)) != len(value):
            raise RecipeError(f"{label}: repeated values in {list(value)}")
        return [int(v) for v in value]
    if spec.kind == "pair":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise RecipeError(f"{label}: expected a list of two floats [a, b], got {_describe(value)}")
        numbers = [_as_float(v) for v in value]
        if any(n is None or not math.isfinite(n) for n in numbers):
            raise RecipeError(f"{label}: expected a list of two floats [a, b], got {_describe(list(value))}")
        for n in numbers:
            _check_range(n, spec, label)
        if spec.ordered and numbers[0] > numbers[1]:
            raise RecipeError(f"{label}: first value must be <= second, got {numbers}")
        return numbers
    raise AssertionError(f"unhandled field kind {spec.kind}")  # pragma: no cover


def _check_range(number: float, spec: Field, label: str) -> None:
    if spec.low is not None and (number < spec.low or (spec.low_open and number == spec.low)):
        op = ">" if spec.low_open else ">="
        _range_error(number, spec, label, f"must be {op} {_fmt(spec.low)}")
    if spec.high is not None and (number > spec.high or (spec.high_open and number == spec.high)):
        op = "<" if spec.high_open else "<="
        _range_error(number, spec, label, f"must be {op} {_fmt(spec.high)}")


def _range_error(number: float, spec: Field, label: str, rule: str) -> None:
    if spec.low is not None and spec.high is not None:
        left = "(" if spec.low_open else "["
        right = ")" if spec.high_open else "]"
        rule = f"must be in {left}{_fmt(spec.low)}, {_fmt(spec.high)}{right}"
    shown = int(number) if spec.kind == "int" else number
    raise RecipeError(f"{label}: {rule}, got {shown}")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_tokenizer(value: Any, spec: Field, label: str) -> Any:
    """A stack name, or a custom stack: a non-empty list of layer-description mappings.

    Layer descriptions are validated in detail by ``scott.tokenizer`` when the stack is built.
    """
    if isinstance(value, str):
        if value not in spec.choices:
            options = ", ".join(repr(c) for c in spec.choices)
            raise RecipeError(
                f"{label}: expected one of {options} or a list of layers, got {_describe(value)}"
                f"{_suggest(value, spec.choices)}"
            )
        return value
    if isinstance(value, list) and value:
        for index, layer in enumerate(value):
            _check_layer(layer, index, label)
        if not any(isinstance(layer, dict) and "conv" in layer for layer in value):
            raise RecipeError(f"{label}: a custom stack needs at least one {{conv: {{...}}}} layer")
        return value
    raise RecipeError(f"{label}: expected a stack name or a list of layers, got {_describe(value)}")


def _check_layer(layer: Any, index: int, label: str) -> None:
    """One custom-stack layer: a name (``relu``, ``maxblurpool``, ...) or a one-key mapping."""
    where = f"{label}[{index}]"
    if isinstance(layer, str):
        if layer.lower() not in _STRING_LAYER_STRIDES:
            raise RecipeError(f"{where}: unknown layer {layer!r}{_suggest(layer.lower(), _STRING_LAYER_STRIDES)} "
                              f"(layers: {', '.join(_STRING_LAYER_STRIDES)} or a {{conv: {{...}}}} mapping)")
        return
    if not isinstance(layer, dict) or len(layer) != 1:
        raise RecipeError(f"{where}: expected a layer name or a one-key mapping such as {{conv: {{out: 64, "
                          f"kernel: 7, stride: 2}}}}, got {_describe(layer)}")
    (name, args), = layer.items()
    if name not in _DICT_LAYER_ARGS:
        raise RecipeError(f"{where}: unknown layer {name!r}{_suggest(name, _DICT_LAYER_ARGS)} "
                          f"(mapping layers: {', '.join(_DICT_LAYER_ARGS)})")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RecipeError(f"{where}: {name}: expected a mapping of arguments, got {_describe(args)}")
    for key, arg in args.items():
        if key not in _DICT_LAYER_ARGS[name]:
            allowed = ", ".join(_DICT_LAYER_ARGS[name]) or "none"
            raise RecipeError(f"{where}: {name}: unknown argument {key!r} (arguments: {allowed})")
        if key == "bias":
            if not isinstance(arg, bool):
                raise RecipeError(f"{where}: {name}.bias: expected bool, got {_describe(arg)}")
        elif isinstance(arg, bool) or not isinstance(arg, int) or arg < 1:
            raise RecipeError(f"{where}: {name}.{key}: expected an int >= 1, got {_describe(arg)}")
    if name == "conv":
        kernel, stride = args.get("kernel", 3), args.get("stride", 1)
        if kernel % 2 == 0 and not (kernel == stride and kernel > 1):
            raise RecipeError(f"{where}: conv.kernel: must be odd (same padding) or equal to the stride "
                              f"(patchify), got kernel {kernel}, stride {stride}")


def _layer_stride(layer: Any) -> int:
    if isinstance(layer, str):
        return _STRING_LAYER_STRIDES[layer.lower()]
    (name, args), = layer.items()
    return int((args or {}).get("stride", {"conv": 1, "blur": 2}.get(name, 1)))


def _check_custom_stack(stack: list, model: Mapping, source: str) -> None:
    """Total stride = patch size; every conv but the last names its ``out``; the last gives embed_dim."""
    stride = math.prod(_layer_stride(layer) for layer in stack)
    if stride != model["patch_size"]:
        raise RecipeError(f"{source}: model.tokenizer: the custom stack's total stride is {stride} but "
                          f"model.patch_size is {model['patch_size']}")
    convs = [(i, (layer["conv"] or {})) for i, layer in enumerate(stack) if isinstance(layer, dict) and "conv" in layer]
    for i, args in convs[:-1]:
        if "out" not in args:
            raise RecipeError(f"{source}: model.tokenizer[{i}]: conv needs 'out' channels (only the last conv "
                              "may leave it out and output model.embed_dim)")
    last, args = convs[-1]
    if args.get("out", model["embed_dim"]) != model["embed_dim"]:
        raise RecipeError(f"{source}: model.tokenizer[{last}]: the last conv outputs {args['out']} channels "
                          f"but model.embed_dim is {model['embed_dim']}")


# Rules between keys. Each section's own rules sit together (they also check a section built on
# its own by :func:`as_section`); the rules between sections run on whole recipes only.
def _model_rules(model: Mapping, source: str) -> None:
    if model["img_size"] % model["patch_size"]:
        raise RecipeError(
            f"{source}: model.img_size: {model['img_size']} is not divisible by "
            f"model.patch_size {model['patch_size']}"
        )
    if model["embed_dim"] % model["num_heads"]:
        raise RecipeError(
            f"{source}: model.embed_dim: {model['embed_dim']} is not divisible by "
            f"model.num_heads {model['num_heads']}"
        )
    if model["predictor_dim"] % model["num_heads"]:
        raise RecipeError(
            f"{source}: model.predictor_dim: {model['predictor_dim']} is not divisible by "
            f"model.num_heads {model['num_heads']}"
        )
    for key in ("embed_dim", "predictor_dim"):
        if model[key] % 4:
            raise RecipeError(f"{source}: model.{key}: {model[key]} is not divisible by 4 (the 2-D sin-cos "
                              "positional embedding needs it)")
    stack = model["tokenizer"]
    if isinstance(stack, list):
        _check_custom_stack(stack, model, source)
    if isinstance(stack, str) and stack in _STACK_PATCH_SIZES and model["patch_size"] not in _STACK_PATCH_SIZES[stack]:
        allowed = " or ".join(str(p) for p in _STACK_PATCH_SIZES[stack])
        raise RecipeError(
            f"{source}: model.patch_size: the '{stack}' tokenizer stack has patch size {allowed}, "
            f"got {model['patch_size']}"
        )


def _objective_rules(objective: Mapping, source: str) -> None:
    if objective["global_weight"] > 0 and objective["name"] != "mimjepa":
        raise RecipeError(
            f"{source}: objective.global_weight: the global term regresses MIM-JEPA's target tokens; "
            f"objective.name {objective['name']!r} has none (set it to 0)"
        )
    if objective["dino_weight"] > 0 and objective["name"] != "mimjepa":
        raise RecipeError(
            f"{source}: objective.dino_weight: self-distillation uses MIM-JEPA's EMA target encoder "
            f"as its teacher; objective.name {objective['name']!r} has none (set it to 0)"
        )
    if objective["target_shift"] > 0 and objective["name"] != "mimjepa":
        raise RecipeError(
            f"{source}: objective.target_shift: the shift moves MIM-JEPA's target view; "
            f"objective.name {objective['name']!r} regresses the context view's pixels (set it to 0)"
        )
    if objective["ema_start"] > objective["ema_end"]:
        raise RecipeError(
            f"{source}: objective.ema_start: {objective['ema_start']} is larger than "
            f"objective.ema_end {objective['ema_end']}"
        )


def _optim_rules(optim: Mapping, source: str) -> None:
    if optim["batch_size"] % optim["accum_steps"]:
        raise RecipeError(
            f"{source}: optim.batch_size: global batch {optim['batch_size']} is not divisible by "
            f"optim.accum_steps {optim['accum_steps']}"
        )
    if optim["start_lr"] > optim["lr"] or optim["min_lr"] > optim["lr"]:
        raise RecipeError(
            f"{source}: optim.lr: peak lr {optim['lr']} is below optim.start_lr "
            f"{optim['start_lr']} or optim.min_lr {optim['min_lr']}"
        )


def _between_sections_rules(recipe: Mapping, source: str) -> None:
    model, mask, objective = recipe["model"], recipe["mask"], recipe["objective"]
    num_patches = (model["img_size"] // model["patch_size"]) ** 2
    if mask["kind"] == "blockwise" and mask["min_block"] > num_patches:
        raise RecipeError(
            f"{source}: mask.min_block: {mask['min_block']} patches is more than the "
            f"{num_patches} patches of a {model['img_size']} px image"
        )
    if 2 * objective["target_shift"] >= model["img_size"]:
        raise RecipeError(
            f"{source}: objective.target_shift: {objective['target_shift']} px must be less than "
            f"half the model.img_size of {model['img_size']} px"
        )
    if objective["target_layers"] > 1 and objective["target_layers"] > model["depth"]:
        raise RecipeError(
            f"{source}: objective.target_layers: {objective['target_layers']} is more than the "
            f"model.depth of {model['depth']} blocks"
        )


def _complete_model(model: dict, explicit: set[str]) -> None:
    """``model.size`` presets fill the keys the recipe leaves out; ``predictor_dim: null`` is embed_dim."""
    if model["size"] is not None:
        for key, value in zip(_PRESET_KEYS, SIZE_PRESETS[model["size"]]):
            if key not in explicit:
                model[key] = value
    if model["predictor_dim"] is None:
        model["predictor_dim"] = model["embed_dim"]


def _complete_data(data: dict) -> None:
    """``data.eval_split: null`` is ``test``, or ``val`` for a dataset without a test split (a folder)."""
    from scott.data.roots import SPLITS  # no torch

    if data["eval_split"] is None:
        data["eval_split"] = "test" if "test" in SPLITS[data["name"]] else "val"


def _section_rules(section: str, body: Mapping, source: str) -> None:
    rule = {"data": _check_eval_split, "model": _model_rules, "objective": _objective_rules,
            "optim": _optim_rules}.get(section)
    if rule is not None:
        rule(body, source)


def _check_eval_split(data: Mapping, source: str) -> None:
    """``data.eval_split`` must be a split the dataset has (``val`` only with an official one)."""
    from scott.data.roots import SPLITS  # no torch

    if "test" not in SPLITS[data["name"]]:  # your own folder: no test split, "val" is carved from it
        if data["eval_split"] != "val":
            raise RecipeError(
                f"{source}: data.eval_split: '{data['name']}' has no test split; use eval_split: val (kNN and "
                "probes then carve data.val_fraction of the labelled images as queries)")
        return
    if data["eval_split"] not in SPLITS[data["name"]]:
        with_val = ", ".join(name for name, splits in SPLITS.items() if "val" in splits)
        raise RecipeError(
            f"{source}: data.eval_split: '{data['name']}' has no '{data['eval_split']}' split (only {with_val} "
            "have an official val split); use eval_split: test (probes carve their validation split from "
            "train themselves)"
        )


def _check_data_folder(recipe: dict, source: str) -> None:
    """Local data that must exist: imagefolder/imagenet100 roots, fashion_mnist without download, a demo data.root."""
    from scott.data.roots import FASHION_MNIST_FILES, default_root, find_idx_file  # no torch

    data = recipe["data"]
    name = data["name"]
    if name == "folder":
        if data["root"] is None:
            raise RecipeError(f"{source}: data.root: required for data.name 'folder' (the folder holding your images)")
        if not Path(data["root"]).expanduser().is_dir():
            raise RecipeError(f"{source}: data.root: folder '{Path(data['root']).expanduser()}' does not exist")
        return
    if name == "imagefolder" and data["root"] is None:
        raise RecipeError(f"{source}: data.root: required for data.name 'imagefolder' (a folder with train/ and test/)")
    root = Path(data["root"]).expanduser() if data["root"] is not None else default_root(name)
    if name in _LOCAL_ONLY:
        if not root.is_dir():
            raise RecipeError(f"{source}: data.root: data folder '{root}' does not exist")
        if not (root / "train").is_dir():
            raise RecipeError(f"{source}: data.root: data folder '{root}' has no 'train' subfolder")
    elif (name == "fashion_mnist" and not data["download"]) or (name == "demo" and data["root"] is not None):
        hint = ("remove data.root to use the embedded demo subset" if name == "demo" else
                "install the Debian package dataset-fashion-mnist or set data.download: true")
        if not root.is_dir():
            raise RecipeError(f"{source}: data.root: data folder '{root}' does not exist ({hint})")
        missing = [
            stem for stems in FASHION_MNIST_FILES.values() for stem in stems if find_idx_file(root, stem) is None
        ]
        if missing:
            raise RecipeError(
                f"{source}: data.root: '{root}' lacks the Fashion-MNIST IDX files {', '.join(missing)} ({hint})"
            )
    elif name in ("flowers", "pets") and not data["download"] and not root.is_dir():
        raise RecipeError(
            f"{source}: data.root: data folder '{root}' does not exist (set data.download: true "
            "to let torchvision fetch it)"
        )
