#!/usr/bin/env python
"""Weighted kNN (DINO) evaluation of a pretrained encoder, an untrained one, or raw pixels.

    python tools/eval_knn.py runs/demo                      # the encoder the run exports, k = 10 20 100 200
    python tools/eval_knn.py runs/demo --which target --k 20 --json knn.json
    python tools/eval_knn.py --random-init recipes/demo.yaml
    python tools/eval_knn.py --pixels demo

Memory bank: the labelled train split (``trainval``) of the recipe's dataset; queries: its
``data.eval_split`` (test). Patch tokens pooled as the encoder's ``model.global_pool`` (``--pool``),
L2-normalised, cosine, exp(s/T) votes.

``--val-only`` scores the validation split the probes and ``tools/finetune.py`` choose on
instead (``data.val_fraction`` of the labelled bank, stratified, carved with ``--seed``; the
rest is the bank) and never builds the test split: for choosing settings.

``--whiten D`` PCA-whitens the features to D dimensions before the cosine, fit on the bank alone
(:mod:`scott.eval.whitening`; no labels, never the queries): every kept direction weighs the same.
Choose D with ``--val-only`` and give every row of a comparison the same read-out.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from scott.cli import run_cli  # noqa: E402
from scott.eval.knn import knn_classify_many  # noqa: E402
from scott.eval.whitening import fit_whitening  # noqa: E402
from scott.eval.runs import (  # noqa: E402
    add_pool_arg, add_source_args, carve_validation_queries, command_line, default_json_path, eval_bank, eval_datasets,
    features_for, limit_dataset,
    resolve_device, resolve_pool, result_record, source_from_args, write_json,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(parser)
    add_pool_arg(parser)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbour counts")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote temperature T [0.07]")
    parser.add_argument("--cache-dir", default=None, help="feature cache folder (default: none)")
    parser.add_argument("--val-only", action="store_true",
                        help="queries: the validation split carved from the bank (with --seed); the test split "
                             "is never built (for choosing settings)")
    parser.add_argument("--whiten", type=int, default=0, metavar="D",
                        help="PCA-whiten the features to D dimensions, fit on the bank only (mean, leading "
                             "directions, unit variance; scott.eval.whitening), before the cosine; choose D with "
                             "--val-only [0 = off]")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="with --val-only: the carved share (default: the recipe's data.val_fraction)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    console = Console()
    if any(k < 1 for k in args.k) or args.temperature <= 0:
        console.print("[red]error:[/] --k values must be >= 1 and --temperature > 0")
        return 2
    if args.val_fraction is not None and not (args.val_only and 0 < args.val_fraction < 1):
        console.print("[red]error:[/] --val-fraction goes with --val-only and lies in (0, 1)")
        return 2
    if args.whiten < 0:
        console.print("[red]error:[/] --whiten D needs D >= 1 (0 = off)")
        return 2
    source = source_from_args(args)
    device = resolve_device(args.device)
    name = source.recipe["data"]["name"]
    if args.val_only:
        val_fraction = args.val_fraction or float(source.recipe["data"]["val_fraction"])
        train, test = carve_validation_queries(limit_dataset(eval_bank(source.recipe), args.limit_train, args.seed),
                                               val_fraction, args.seed)
        query_tag, query_name = f"{name}-val", "val"
    else:
        train, test = eval_datasets(source.recipe)
        train = limit_dataset(train, args.limit_train, args.seed)
        query_tag, query_name = f"{name}-test", "test"
    test = limit_dataset(test, args.limit_test, args.seed)
    pool = resolve_pool(args, source)
    xb, yb = features_for(source, train, f"{name}-trainval", pool, args.batch_size, device, args.cache_dir,
                          args.num_workers)
    xq, yq = features_for(source, test, query_tag, pool, args.batch_size, device, args.cache_dir,
                          args.num_workers)
    if args.whiten:
        try:
            white = fit_whitening(xb, args.whiten)  # the bank's statistics only, never the queries'
        except ValueError as exc:
            console.print(f"[red]error:[/] --whiten {args.whiten}: {exc}")
            return 2
        xb, xq = white(xb), white(xq)
    results = knn_classify_many(xb, yb, xq, yq, ks=args.k, temperature=args.temperature)

    table = Table(title=f"weighted kNN: {source.description}",
                  caption=f"{name}: {len(yb)} train / {len(yq)} {query_name}, T={args.temperature}, pool {pool}"
                          + (f", whitened to {args.whiten}" if args.whiten else ""))
    table.add_column("k", justify="right")
    table.add_column("top-1 %", justify="right")
    table.add_column("top-5 %", justify="right")
    for k, (top1, top5) in results.items():
        table.add_row(str(k), f"{100 * top1:.2f}", f"{100 * top5:.2f}")
    console.print(table)

    record = result_record(
        "eval_knn", source, command_line(__file__, argv),
        args.seed, len(yb), len(yq),
        {"k": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()},
         "temperature": args.temperature, "pool": pool, "queries": query_name, "val_only": args.val_only,
         "whiten": args.whiten},
        {"limit_train": args.limit_train, "limit_test": args.limit_test},
    )
    out = args.json or default_json_path(source, "knn")
    if out:
        console.print(f"results -> {write_json(out, record)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
