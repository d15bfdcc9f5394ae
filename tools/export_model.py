#!/usr/bin/env python
"""Export a run as a model folder to share (Hugging Face / timm layout), optionally measuring it.

    python tools/export_model.py runs/demo --out runs/demo/export
    python tools/export_model.py runs/demo --out runs/demo/export --knn --linear
    python tools/export_model.py runs/demo --out export_target --which target --knn

Writes OUT/config.json (timm's keys + a ``scott`` block), OUT/model.safetensors (ScottViT
weights with a sha256) and OUT/README.md (the model card: recipe, data, steps, metrics). With
--knn the card gets the end-of-run kNN report on the recipe's ``data.eval_split``
(``scott.eval.online.compare_with_random_init``: bank = train, k = ``train.monitor_k``, the
encoder's own pooling, next to a random-init encoder and raw pixels); with --linear the linear
probe of tools/eval_linear.py (lr / epochs chosen on a validation split carved from train, the
test split evaluated once). Numbers not measured are marked so on the card.

Load the folder offline with ``scott.from_pretrained(OUT)`` or
``timm.create_model("local-dir:OUT", pretrained=True)`` (after ``import scott``).

Exit status: 0 written, 2 missing run / damaged encoder / bad recipe or data (one line on stderr).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scott.cli import run_cli  # noqa: E402
from scott.config import RecipeError  # noqa: E402


def parse_args(argv=None):
    from scott.eval.linear import DEFAULT_EPOCHS, DEFAULT_LRS
    from scott.eval.runs import add_which_arg

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder (or an exported encoder .safetensors file)")
    parser.add_argument("--out", required=True, help="folder to write (created; its three files are replaced)")
    add_which_arg(parser, "which encoder of a run folder to export")
    parser.add_argument("--knn", action="store_true", help="measure kNN top-1 on the recipe's eval split")
    parser.add_argument("--linear", action="store_true", help="measure the linear probe on the recipe's eval split")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value for the measurements (e.g. data.root=/data/fmnist)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the linear probe's split and init [0]")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="linear probe lr grid")
    parser.add_argument("--epochs", type=int, nargs="+", default=list(DEFAULT_EPOCHS),
                        help="linear probe epoch grid")
    parser.add_argument("--batch-size", type=int, default=128, help="feature extraction batch size [128]")
    return parser.parse_args(argv)


def which_of(run: Path, which: str | None) -> str:
    """The encoder ``run`` means (``--which`` or the run's ``train.export_encoder``); RecipeError
    when the run's recipe cannot be read."""
    from scott.eval.features import resolve_which

    if not run.exists():
        raise RecipeError(f"{run}: no such run folder or encoder file")
    try:
        return resolve_which(run, which)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def check_export(run: Path, which: str) -> Path:
    """The encoder file, verified (sha256) before anything is measured; RecipeError if unusable."""
    from scott.checkpoint import CheckpointError, load_encoder_file
    from scott.eval.features import encoder_file

    try:  # ``run`` exists: which_of checked it
        path = encoder_file(run, which)
        load_encoder_file(path)
    except FileNotFoundError as exc:
        raise RecipeError(f"{exc} (has the run finished and exported its encoders?)") from None
    except (CheckpointError, ValueError, OSError) as exc:
        raise RecipeError(str(exc)) from None
    return path


def measure_knn(run_dir: Path, recipe, which: str, device) -> dict:
    """The end-of-run kNN report of the run (both pretrained encoders, random init, pixels) with
    the bank / query sizes."""
    from scott.eval.online import compare_with_random_init, knn_sets

    try:
        report = compare_with_random_init(run_dir, recipe, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise RecipeError(f"kNN: {exc}") from None
    bank, queries = knn_sets(recipe, report["split"])
    return {**report, "n_bank": len(bank), "n_query": len(queries)}


def measure_linear(run: Path, which: str, args, device) -> dict:
    """The linear probe of tools/eval_linear.py on the run's recipe (defaults of that tool)."""
    from scott.eval.linear import linear_grid, linear_probe
    from scott.eval.runs import default_cache_dir, load_run_source, probe_features

    if any(lr <= 0 for lr in args.lrs) or any(e < 1 for e in args.epochs):
        raise RecipeError("--lrs must be > 0 and --epochs >= 1")
    source = load_run_source(run, which, args.overrides, device)
    pool = getattr(source.encoder, "global_pool", "avg")
    train, test = probe_features(source, pool, args.batch_size, device, default_cache_dir(source), seed=args.seed)
    val_fraction = float(source.recipe["data"]["val_fraction"])
    result = linear_probe(train, test, grid=linear_grid(args.lrs, args.epochs), val_fraction=val_fraction,
                          seed=args.seed, refit="train+val", device=device)
    return {"top1": result.test["top1"], "top5": result.test["top5"],
            "mean_per_class": result.test["mean_per_class"], "split": source.recipe["data"]["eval_split"],
            "n_train": len(train), "n_test": len(test), "pool": pool,
            "selected": {k: result.best[k] for k in ("lr", "epochs") if k in result.best}}


def main(argv=None):
    args = parse_args(argv)
    from scott.checkpoint import CheckpointError
    from scott.eval.runs import resolve_device
    from scott.hub import export_pretrained

    run = Path(args.run)
    args.which = which_of(run, args.which)
    check_export(run, args.which)
    run_dir = run if run.is_dir() else run.parent
    metrics = {}
    if args.knn or args.linear:
        from scott.config import load_recipe

        recipe_path = run_dir / "recipe.yaml"
        if not recipe_path.is_file():
            raise RecipeError(f"{recipe_path}: run recipe not found; --knn / --linear measure on the run's recipe")
        recipe = load_recipe(recipe_path, args.overrides)
        device = resolve_device(args.device)
        if args.knn:
            metrics["knn"] = measure_knn(run_dir, recipe, args.which, device)
        if args.linear:
            metrics["linear"] = measure_linear(run, args.which, args, device)
    try:
        out = export_pretrained(run, args.out, metrics=metrics, which=args.which)
    except (FileNotFoundError, CheckpointError, ValueError, OSError) as exc:
        raise RecipeError(str(exc)) from None
    for name, entry in metrics.items():
        value = entry["pretrained_context" if args.which == "context" else "pretrained"] if name == "knn" \
            else entry["top1"]
        print(f"{name} top-1 on the {entry['split']} split: {100 * value:.2f} %")
    print(f"model folder -> {out} (config.json, model.safetensors, README.md)")
    return 0


if __name__ == "__main__":
    run_cli(main)
