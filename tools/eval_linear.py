#!/usr/bin/env python
"""Linear probe (MAE protocol: BatchNorm1d(affine=False) + Linear on frozen avg-pooled features).

    python tools/eval_linear.py runs/demo
    python tools/eval_linear.py runs/demo --lrs 0.03 0.1 0.3 --epochs 20 50 --json linear.json
    python tools/eval_linear.py --pixels demo

lr and epochs are chosen on a validation split carved from the labelled train split
(``data.val_fraction``, stratified, seeded); the chosen setting is retrained on train+val (or the
fit part with --refit train) and the test split is evaluated once.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from scott.cli import run_cli  # noqa: E402
from scott.eval.linear import DEFAULT_EPOCHS, DEFAULT_LRS, linear_grid, linear_probe  # noqa: E402
from scott.eval.runs import (  # noqa: E402
    add_pool_arg, add_source_args, command_line, default_cache_dir, log_probe_candidate, probe_features, report_probe,
    resolve_device, resolve_pool, source_from_args,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(parser)
    add_pool_arg(parser)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="learning-rate grid")
    parser.add_argument("--epochs", type=int, nargs="+", default=list(DEFAULT_EPOCHS), help="epoch grid")
    parser.add_argument("--probe-batch-size", type=int, default=256, help="probe mini-batch [256]")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="probe weight decay [0]")
    parser.add_argument("--val-fraction", type=float, default=None, help="default: the recipe's data.val_fraction")
    parser.add_argument("--refit", choices=["train", "train+val"], default="train+val")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: RUN_DIR/cache/features)")
    parser.add_argument("--no-cache", action="store_true", help="do not cache features")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    console = Console()
    if any(lr <= 0 for lr in args.lrs) or any(e < 1 for e in args.epochs):
        console.print("[red]error:[/] --lrs must be > 0 and --epochs >= 1")
        return 2
    source = source_from_args(args)
    device = resolve_device(args.device)
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir(source))
    pool = resolve_pool(args, source)
    train, test = probe_features(source, pool, args.batch_size, device, cache, args.limit_train,
                                 args.limit_test, args.seed, args.num_workers)
    val_fraction = args.val_fraction or float(source.recipe["data"]["val_fraction"])
    grid = linear_grid(args.lrs, args.epochs, args.probe_batch_size, args.weight_decay)
    result = linear_probe(train, test, grid=grid, val_fraction=val_fraction, seed=args.seed,
                          refit=args.refit, device=device, on_result=log_probe_candidate(console))
    return report_probe("eval_linear", "linear", "linear probe", source, result, args,
                        command_line(__file__, argv), len(train), len(test), val_fraction, pool, console)


if __name__ == "__main__":
    run_cli(main)
