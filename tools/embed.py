"""One feature vector per image of a folder, with its relative path.

    python tools/embed.py RUN_OR_ENCODER FOLDER --out FILE [--which target|context] [--pool P]
                          [--batch-size 64] [--device cpu|cuda] [--on-bad-image error|skip]

RUN_OR_ENCODER is a run folder (the encoder its recipe exports, train.export_encoder, unless
--which target|context names one), an exported encoder file, or a shared model folder (tools/export_model.py). FOLDER is any folder of images (every image at
any depth; hidden files and non-images ignored; class folders, if present, give labels).
Images go through the encoder's own evaluation transform and pooling (model.global_pool, the
kNN evaluation's), batched, on the GPU when there is one. Writes FILE.safetensors,
FILE.npy + FILE.csv (row, path, label, class) and FILE.parquet when pyarrow is installed.

Exit status: 0 written, 2 missing/damaged encoder, missing or empty folder, unreadable image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scott.cli import run_cli  # noqa: E402

POOLS = ("avg", "grid2", "grid3", "flat")


def parse_args(argv=None) -> argparse.Namespace:
    from scott.eval.runs import add_which_arg

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="run folder or encoder .safetensors file")
    parser.add_argument("folder", help="folder of images")
    parser.add_argument("--out", required=True, help="output file name (suffixes are added)")
    add_which_arg(parser, "which encoder of a run folder embeds the images")
    parser.add_argument("--pool", default=None, choices=POOLS, help="[the encoder's model.global_pool]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="[cuda when available, else cpu]")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--on-bad-image", default="error", choices=("error", "skip"))
    parser.add_argument("--max-image-pixels", type=int, default=None,
                        help="refuse larger images (width x height) [data.max_image_pixels' default]")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from scott.config import RecipeError
    from scott.eval.embed import embed_folder, write_embeddings
    from scott.eval.runs import default_device, load_encoder_source

    if args.batch_size < 1:
        raise RecipeError("--batch-size must be >= 1")
    device = default_device(args.device)
    encoder = load_encoder_source(args.source, args.which, device)
    emb = embed_folder(encoder, args.folder, pool=args.pool, batch_size=args.batch_size, device=device,
                       num_workers=args.num_workers, on_bad_image=args.on_bad_image,
                       **({"max_image_pixels": args.max_image_pixels} if args.max_image_pixels else {}))
    files = write_embeddings(emb, args.out)
    labels = f", {len(emb.classes)} classes" if emb.classes else ", no labels"
    print(f"{len(emb.paths)} images{labels} -> {emb.features.shape[1]}-d features ({emb.pool} pooling): "
          + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    run_cli(main)
