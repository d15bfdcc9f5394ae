#!/usr/bin/env python
"""Figures of a run folder, written to RUN_DIR/figures/ as PNG (drawn with PIL):

    masks.png  image | image with masked patches dimmed (targets red) | visible-token map
    pca.png    image | top-3 PCA components of its patch features as RGB (each position's mean
               over --pca-images images removed, so content shows rather than position)
    pca_raw.png  the same without removing the position means
    loss.png   pretraining loss curve (metrics.jsonl)
    knn.png    kNN monitor curve (when the run logged one)

    python tools/visualize.py runs/demo [--num-images 4] [--which target|context] [--seed 0]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scott.cli import run_cli  # noqa: E402
from scott.config import RecipeError  # noqa: E402
from scott.eval.runs import add_which_arg  # noqa: E402
from scott.viz import write_run_figures  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run folder (recipe.yaml, metrics.jsonl, encoder.safetensors)")
    parser.add_argument("--num-images", type=int, default=4)
    add_which_arg(parser, "whose patch tokens the PCA shows")
    parser.add_argument("--seed", type=int, default=0, help="image picks and masks [0]")
    parser.add_argument("--split", default=None, help="dataset split (default: the recipe's data.eval_split)")
    parser.add_argument("--pca-images", type=int, default=64, help="images the PCA is fit on [64]")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise RecipeError(f"{run_dir}: not a run folder (no recipe.yaml)")
    if args.num_images < 1:
        raise RecipeError("--num-images must be >= 1")
    try:
        paths = write_run_figures(run_dir, args.num_images, args.which, args.seed, args.split, args.device,
                                  pca_images=args.pca_images)
    except (FileNotFoundError, ValueError) as exc:
        raise RecipeError(str(exc)) from None
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    run_cli(main)
