"""Look at what an encoder learned on your images: nearest neighbours and a 2-D map.

    python tools/neighbours.py RUN_OR_ENCODER FOLDER [--queries 6] [--k 8] [--out grid.png]
                               [--map map.png] [--seed 0] [--which target|context] [--pool P]

Embeds every image under FOLDER (as tools/embed.py does), draws for --queries images chosen at
random (seeded) their --k nearest neighbours by cosine similarity as one PNG grid (file names
and similarities under the thumbnails), and with --map a PCA map of all embeddings, coloured by
class when FOLDER has class folders.

Exit status: 0 written, 2 missing/damaged encoder, missing or empty folder, unreadable image,
or --k / --queries too large for the folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scott.cli import run_cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from scott.eval.runs import add_which_arg

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="run folder or encoder .safetensors file")
    parser.add_argument("folder", help="folder of images")
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--out", default="neighbours.png")
    parser.add_argument("--map", default=None, help="also write a PCA map of the embeddings here")
    parser.add_argument("--seed", type=int, default=0, help="which images are the queries")
    add_which_arg(parser, "which encoder of a run folder embeds the images")
    parser.add_argument("--pool", default=None, choices=("avg", "grid2", "grid3", "flat"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--thumb", type=int, default=96, help="thumbnail size in pixels")
    parser.add_argument("--whiten", type=int, default=0, metavar="D",
                        help="PCA-whiten the embeddings of the folder to D dimensions before the cosine "
                             "(scott.eval.whitening; often better neighbours, docs/results.md ninth round) [0 = off]")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from PIL import Image

    from scott.config import RecipeError
    from scott.eval.embed import embed_folder, nearest_neighbours
    from scott.eval.runs import default_device, load_encoder_source
    from scott.eval.whitening import fit_whitening
    from scott.viz import embedding_map, neighbour_grid, pca_2d

    device = default_device(args.device)
    encoder = load_encoder_source(args.source, args.which, device)
    emb = embed_folder(encoder, args.folder, pool=args.pool, batch_size=args.batch_size, device=device)
    n = len(emb.paths)
    if not 1 <= args.k < n or not 1 <= args.queries <= n:
        raise RecipeError(f"{args.folder}: {n} images; --k must be in [1, {n - 1}] and --queries in [1, {n}]")
    features, how = emb.features, "cosine"
    if args.whiten:
        try:
            white = fit_whitening(features, args.whiten)
        except ValueError as exc:
            raise RecipeError(f"{args.folder}: --whiten {args.whiten}: {exc}") from None
        features, how = white(features), f"cosine after whitening to {args.whiten}"
    queries = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[:args.queries].tolist()
    idx, sims = nearest_neighbours(features, queries, args.k)
    root = Path(emb.root)

    def image(i):
        with Image.open(root / emb.paths[i]) as img:
            return img.convert("RGB")

    grid = neighbour_grid([image(q) for q in queries], [[image(int(j)) for j in row] for row in idx],
                          [emb.paths[q] for q in queries], [[emb.paths[int(j)] for j in row] for row in idx],
                          sims.tolist(), thumb=args.thumb,
                          title=f"{args.k} nearest neighbours ({emb.pool} pooling, {how}) of {args.queries} "
                                f"of {n} images in {args.folder}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"neighbours of {args.queries} images -> {args.out}")
    if emb.classes:
        same = (emb.labels[idx] == emb.labels[torch.tensor(queries)].unsqueeze(1)).float().mean()
        print(f"{100 * float(same):.1f} % of the neighbours share their query's class folder")
    if args.map:
        labels = emb.labels.tolist() if emb.classes else None
        embedding_map(pca_2d(emb.features), labels, emb.classes,
                      title=f"PCA of {n} embeddings ({emb.pool})").save(args.map)
        print(f"map -> {args.map}")
    return 0


if __name__ == "__main__":
    run_cli(main)
