"""What the evaluation CLIs share: where the encoder and the data come from, result records.

An evaluation "source" is one of
    * a run folder (or an exported ``*.safetensors`` file) -> the trained encoder, its recipe,
    * ``--random-init RECIPE``                               -> an untrained encoder of that recipe,
    * ``--pixels RECIPE-or-data-name``                       -> raw normalised pixels.

Nothing here reads ``sys.argv``: the CLIs in ``tools/`` parse arguments (with the options added
by :func:`add_source_args`) and call these functions.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from scott.eval.features import PixelEncoder, cached_features, extract_features, feature_cache_key, load_encoder

__all__ = [
    "EvalSource",
    "add_source_args",
    "add_which_arg",
    "source_from_args",
    "load_run_source",
    "random_init_source",
    "pixel_source",
    "eval_bank",
    "carve_validation_queries",
    "eval_datasets",
    "limit_dataset",
    "features_for",
    "result_record",
    "write_json",
    "default_json_path",
    "command_line",
]

REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# Native size of datasets whose images are small, for the raw-pixel baseline given a data name.
_PIXEL_NATIVE = {"demo": (28, 1), "fashion_mnist": (28, 1)}


@dataclass
class EvalSource:
    """An encoder to evaluate with the recipe that says which data it belongs to."""

    encoder: nn.Module
    recipe: dict
    description: str
    kind: str  # "run" | "random_init" | "pixels"
    encoder_path: Path | None = None
    run_dir: Path | None = None
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- sources
def _load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    from scott.config import load_recipe

    return load_recipe(path, overrides)


def load_run_source(path: str | Path, which: str | None = None, overrides: Sequence[str] = (),
                    device=None, backend: str | None = None) -> EvalSource:
    """Trained encoder of a run folder (or exported file) and the run's ``recipe.yaml``;
    ``which=None``: the encoder the run exports (:func:`scott.eval.features.resolve_which`)."""
    from scott.config import RecipeError
    from scott.eval.features import resolve_which

    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such run folder or encoder file")
    run_dir = path if path.is_dir() else path.parent
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise RecipeError(f"{recipe_path}: run recipe not found (is {run_dir} a run folder?)")
    recipe = _load_recipe(recipe_path, overrides)
    which = resolve_which(path, which)
    try:
        encoder = load_encoder(path, which=which, device=device, backend=backend)
    except FileNotFoundError as exc:
        raise RecipeError(f"{exc} (has the run finished and exported its encoders?)") from None
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    return EvalSource(encoder, recipe, f"{which} encoder {encoder.source_path}", "run",
                      encoder_path=Path(encoder.source_path), run_dir=run_dir, info={"which": which})


def load_encoder_source(source: str | Path, which: str | None = None, device=None):
    """The encoder of a run folder (``which``, default the one the run exports), an exported
    encoder file or a shared model folder (``config.json`` + ``model.safetensors``,
    :mod:`scott.hub`), for a CLI: a missing or damaged file is a one-line
    :class:`scott.config.RecipeError`."""
    from scott.config import RecipeError

    try:
        if (Path(source) / "config.json").is_file() and (Path(source) / "model.safetensors").is_file():
            from scott.hub import from_pretrained

            return from_pretrained(source).encoder.to(device or "cpu").eval()
        return load_encoder(source, which=which, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise RecipeError(f"{source}: {exc}") from None


def default_device(name: str | None = None) -> str:
    """``name`` if given, else ``cuda`` when a GPU is visible, else ``cpu``."""
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def random_init_source(recipe_path: str | Path, overrides: Sequence[str] = (), seed: int = 0,
                       device=None, backend: str | None = None) -> EvalSource:
    """An untrained encoder built from a recipe (weights drawn from ``seed``)."""
    from scott.models import build_encoder

    recipe = _load_recipe(recipe_path, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_encoder(recipe["model"], backend=backend)  # with the recipe's eval transform
    if device is not None:
        encoder.to(device)
    return EvalSource(encoder.eval(), recipe, f"random-init encoder of {recipe_path} (seed {seed})",
                      "random_init", info={"init_seed": seed})


def pixel_source(recipe_or_data: str, overrides: Sequence[str] = ()) -> EvalSource:
    """Raw-pixel baseline: a recipe file, a recipe name in ``recipes/``, or a dataset name.

    With a dataset name the pixels are taken at the dataset's native size for small images
    (28 px grey for demo / fashion_mnist), otherwise at the recipe defaults.
    """
    from scott.config import RecipeError, resolve_recipe
    from scott.data.transforms import eval_transform_spec

    path = Path(recipe_or_data)
    if path.is_file():
        recipe = _load_recipe(path, overrides)
    elif (REPO_RECIPES / f"{recipe_or_data}.yaml").is_file():
        recipe = _load_recipe(REPO_RECIPES / f"{recipe_or_data}.yaml", overrides)
    else:
        if recipe_or_data not in _data_names():
            raise RecipeError(f"--pixels {recipe_or_data}: neither a recipe file nor a dataset name "
                              f"({', '.join(_data_names())})")
        raw: dict[str, Any] = {"data": {"name": recipe_or_data}}
        if recipe_or_data in _PIXEL_NATIVE:
            size, chans = _PIXEL_NATIVE[recipe_or_data]
            raw["model"] = {"img_size": size, "in_chans": chans, "patch_size": 4, "tokenizer": "small"}
        recipe = resolve_recipe(raw, source=f"--pixels {recipe_or_data}", overrides=overrides,
                                name=recipe_or_data)
    spec = eval_transform_spec(recipe["model"])
    encoder = PixelEncoder(recipe["model"]["in_chans"], spec)
    return EvalSource(encoder, recipe, f"raw pixels ({spec['in_chans']}x{spec['img_size']}x{spec['img_size']})",
                      "pixels", info={"pixels": recipe_or_data})


def _data_names() -> list[str]:
    from scott.config import SCHEMA

    field_spec = SCHEMA["data"]["name"]
    choices = getattr(field_spec, "choices", None)
    return list(choices) if choices else ["demo", "fashion_mnist", "flowers", "pets", "imagenet100", "imagefolder"]


def add_source_args(parser: argparse.ArgumentParser, which: bool = True) -> None:
    """Options every evaluation CLI shares (positional RUN_DIR, --random-init, --pixels, ...)."""
    parser.add_argument("run_dir", nargs="?", help="run folder (or an exported encoder .safetensors file)")
    if which:
        add_which_arg(parser, "which encoder of a run folder to evaluate")
    parser.add_argument("--random-init", metavar="RECIPE", help="evaluate an untrained encoder of RECIPE")
    parser.add_argument("--pixels", metavar="RECIPE_OR_DATA", help="evaluate raw pixels (baseline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value (e.g. data.root=/data/fmnist); repeatable")
    parser.add_argument("--json", metavar="FILE", help="write results as JSON (default: RUN_DIR/eval/<tool>.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed (subsets, splits, probe init) [0]")
    parser.add_argument("--batch-size", type=int, default=128, help="feature extraction batch size [128]")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--backend", default=None, help="override the tokenizer backend (dense|tiles|spconv)")
    parser.add_argument("--limit-train", type=int, default=None, metavar="N",
                        help="use a seeded random subset of N labelled train images")
    parser.add_argument("--limit-test", type=int, default=None, metavar="N",
                        help="use a seeded random subset of N test images")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers [0]")


def add_which_arg(parser: argparse.ArgumentParser, purpose: str) -> None:
    """``--which target|context``; unset means the encoder the run exports (its recipe's
    ``train.export_encoder``, :func:`scott.eval.features.resolve_which`)."""
    parser.add_argument("--which", choices=["target", "context"], default=None,
                        help=f"{purpose}: the EMA target or the context encoder (default: the one the "
                             "run exports, its recipe's train.export_encoder)")


def add_pool_arg(parser: argparse.ArgumentParser) -> None:
    """``--pool`` of the tools that evaluate one feature vector per image."""
    from scott.models.encoder import GLOBAL_POOLS

    parser.add_argument("--pool", choices=GLOBAL_POOLS, default=None,
                        help="token pooling (default: the encoder's model.global_pool, avg if unset)")


def resolve_pool(args: argparse.Namespace, source: EvalSource) -> str:
    """The pooling a tool uses: ``--pool`` or the encoder's own ``global_pool``."""
    return getattr(args, "pool", None) or getattr(source.encoder, "global_pool", "avg")


def source_from_args(args: argparse.Namespace) -> EvalSource:
    """The one source named by parsed CLI arguments (exactly one of RUN_DIR, --random-init, --pixels)."""
    from scott.config import RecipeError

    given = [n for n, v in (("RUN_DIR", args.run_dir), ("--random-init", args.random_init),
                            ("--pixels", args.pixels)) if v]
    if len(given) != 1:
        raise RecipeError(f"give exactly one of RUN_DIR, --random-init RECIPE, --pixels RECIPE_OR_DATA "
                          f"(got {', '.join(given) or 'none'})")
    device = resolve_device(args.device)
    if args.run_dir:
        return load_run_source(args.run_dir, getattr(args, "which", None), args.overrides, device, args.backend)
    if args.random_init:
        return random_init_source(args.random_init, args.overrides, args.seed, device, args.backend)
    return pixel_source(args.pixels, args.overrides)


def resolve_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- data
def _evaluation_data(recipe: dict, build, in_chans: int | None):
    """``build(data_cfg, data.eval_split, train.seed, in_chans=...)`` with data errors as one
    RecipeError naming the dataset."""
    from scott.config import RecipeError
    from scott.data.datasets import DatasetError

    data_cfg = recipe["data"]
    try:
        return build(data_cfg, data_cfg["eval_split"], int(recipe["train"]["seed"]), in_chans=in_chans)
    except (DatasetError, FileNotFoundError) as exc:
        raise RecipeError(f"data {data_cfg['name']!r}: {exc}") from None


def eval_datasets(recipe: dict, in_chans: int | None = None):
    """(labelled bank, queries) for ``data.eval_split``, by the one rule of
    :func:`scott.data.eval_splits.bank_and_queries` (``test``: trainval vs test; ``val``: never a
    query image in the bank; a carve-out uses ``train.seed``)."""
    from scott.data.eval_splits import bank_and_queries

    return _evaluation_data(recipe, bank_and_queries, in_chans)


def eval_bank(recipe: dict, in_chans: int | None = None):
    """The labelled bank of :func:`eval_datasets` alone: the queries' split (the test split for
    ``data.eval_split: test``) is never built or read."""
    from scott.data.eval_splits import bank_only

    return _evaluation_data(recipe, bank_only, in_chans)


def carve_validation_queries(bank, val_fraction: float, seed: int):
    """(fit part, validation part) of a labelled ``bank``: the stratified, seeded carve-out of
    :func:`scott.data.datasets.split_train_val` that the probes and fine-tuning choose on."""
    from scott.data.datasets import split_train_val

    fit, val = split_train_val(dataset_labels(bank).numpy(), val_fraction, seed)
    return (torch.utils.data.Subset(bank, fit.tolist()), torch.utils.data.Subset(bank, val.tolist()))


def limit_dataset(dataset, limit: int | None, seed: int):
    """A seeded random subset of ``limit`` items (the whole dataset when ``limit`` is None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=gen)[:limit].sort().values.tolist()
    return torch.utils.data.Subset(dataset, index)


def features_for(source: EvalSource, dataset, split_tag: str, pool: str, batch_size: int,
                 device=None, cache_dir: str | Path | None = None, num_workers: int = 0):
    """Features of ``dataset`` for ``source`` (cached on disk when the encoder is a file)."""
    def compute():
        return extract_features(source.encoder, dataset, pool=pool, batch_size=batch_size, device=device,
                                num_workers=num_workers, description=f"{split_tag} ({pool})")

    if cache_dir is None or source.encoder_path is None:
        return compute()
    key = feature_cache_key(source.encoder_path, split_tag, pool, extra=_dataset_tags(source, dataset))
    return cached_features(cache_dir, key, compute)


def _dataset_tags(source: EvalSource, dataset) -> list[str]:
    """Cache-key tags that tell datasets apart: size, the subset's indices and the data section."""
    import hashlib

    h = hashlib.sha256(json.dumps(dict(source.recipe["data"]), sort_keys=True, default=str).encode())
    if isinstance(dataset, torch.utils.data.Subset):
        h.update(",".join(map(str, dataset.indices)).encode())
    return [f"n{len(dataset)}", h.hexdigest()[:12]]


# ----------------------------------------------------------------------------- results
def _bank_split(data_cfg: dict) -> str:
    from scott.data.eval_splits import eval_plan

    plan = eval_plan(data_cfg["name"], data_cfg["eval_split"])
    return f"{plan.bank} (fit part)" if plan.carved else plan.bank


def result_record(tool: str, source: EvalSource, command: str, seed: int, n_train: int, n_test: int,
                  results: dict, extra: dict | None = None) -> dict:
    """A JSON-able record: results plus everything needed to reproduce them."""
    data_cfg = source.recipe["data"]
    return {
        "tool": tool,
        **results,
        "n_train": n_train,
        "n_test": n_test,
        "encoder": source.description,
        "source": source.kind,
        **({"which": source.info["which"]} if "which" in source.info else {}),
        "data": data_cfg["name"],
        "train_split": _bank_split(data_cfg),
        "test_split": data_cfg["eval_split"],
        "command": command,
        "seed": seed,
        "recipe": source.recipe,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **(extra or {}),
    }


def command_line(tool_file: str, argv: Sequence[str] | None) -> str:
    """The exact command: the process's argv, or ``python TOOL ARGV`` when called with ``argv``."""
    import shlex
    import sys

    if argv is None:
        return shlex.join([sys.executable, *sys.argv])
    return shlex.join([sys.executable, str(tool_file), *argv])


def default_json_path(source: EvalSource, tool: str) -> Path | None:
    """``RUN_DIR/eval/<tool>_<which>.json`` for run sources, None otherwise."""
    if source.run_dir is None:
        return None
    return source.run_dir / "eval" / f"{tool}_{source.info.get('which', 'target')}.json"


def _plain(value):
    """JSON fallback: recipes and their sections as dicts (``to_dict``), anything else as text."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else str(value)


def write_json(path: str | Path, record: dict) -> Path:
    """Write ``record`` as indented JSON (parents created, atomic rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False, default=_plain) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- probes
def probe_features(source: EvalSource, pool: str, batch_size: int, device=None, cache_dir=None,
                   limit_train: int | None = None, limit_test: int | None = None, seed: int = 0,
                   num_workers: int = 0):
    """(train FeatureSet, test FeatureSet) of the recipe's dataset for a probe."""
    from scott.eval.protocol import FeatureSet

    train, test = eval_datasets(source.recipe)
    train = limit_dataset(train, limit_train, seed)
    test = limit_dataset(test, limit_test, seed)
    name = source.recipe["data"]["name"]
    xt, yt = features_for(source, train, f"{name}-trainval", pool, batch_size, device, cache_dir, num_workers)
    xe, ye = features_for(source, test, f"{name}-test", pool, batch_size, device, cache_dir, num_workers)
    return FeatureSet(xt, yt), FeatureSet(xe, ye)


def default_cache_dir(source: EvalSource) -> Path | None:
    """``RUN_DIR/cache/features`` for run sources (feature cache of the probes)."""
    return None if source.run_dir is None else source.run_dir / "cache" / "features"


def selection_table(result, title: str):
    """Rich table: validation metrics of every grid point, the chosen one marked, test once."""
    from rich.table import Table

    table = Table(title=title)
    keys = [k for k in result.table[0] if not k.startswith("val_")] if result.table else []
    varying = [k for k in keys if len({str(r[k]) for r in result.table}) > 1] or keys[:2]
    for k in varying:
        table.add_column(k, justify="right")
    table.add_column("val top-1 %", justify="right")
    table.add_column("", justify="left")
    for row in result.table:
        chosen = all(row.get(k) == v for k, v in result.best.items())
        table.add_row(*[str(row[k]) for k in varying], f"{100 * row['val_top1']:.2f}", "<- chosen" if chosen else "")
    return table


def probe_summary(result) -> str:
    """Text: how the setting was chosen, the single test measurement, a grid-edge warning."""
    lines = [
        f"selected on val ({result.n_val} images carved from train, seed {result.seed}), "
        f"refit on {result.refit} ({result.n_refit} images)",
        f"TEST ({result.n_test} images, evaluated once): top-1 {100 * result.test['top1']:.2f} %  "
        f"top-5 {100 * result.test['top5']:.2f} %  mean per class {100 * result.test['mean_per_class']:.2f} %",
    ]
    edges = result.to_dict()["best_at_grid_edge"]
    if edges:
        lines.append(f"note: the chosen {', '.join(edges)} is at the edge of the grid; consider extending it")
    return "\n".join(lines)


def dataset_labels(dataset) -> "torch.Tensor":
    """Labels of a map-style dataset as a long tensor (uses ``.labels`` where available)."""
    import numpy as np

    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def log_probe_candidate(console):
    """``on_result`` callback printing one line per hyper-parameter candidate."""
    return lambda r: console.log(f"lr {r['lr']} epochs {r['epochs']}: val top-1 {100 * r['val_top1']:.2f} %")


def report_probe(tool: str, short: str, title: str, source: EvalSource, result, args: argparse.Namespace,
                 command: str, n_train: int, n_test: int, val_fraction: float, pool: str, console) -> int:
    """Print a probe's selection table and test result, and write its JSON record."""
    console.print(selection_table(result, f"{title}: {source.description}"))
    console.print(probe_summary(result))
    record = result_record(
        tool, source, command, args.seed, n_train, n_test,
        {"top1": result.test["top1"], "top5": result.test["top5"],
         "mean_per_class": result.test["mean_per_class"], "probe": result.to_dict(),
         "val_fraction": val_fraction, "pool": pool},
        {"limit_train": args.limit_train, "limit_test": args.limit_test},
    )
    out = args.json or default_json_path(source, short)
    if out:
        console.print(f"results -> {write_json(out, record)}")
    return 0
