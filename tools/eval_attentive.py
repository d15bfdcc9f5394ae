#!/usr/bin/env python
"""Attentive probe: learned-query cross-attention pooling over frozen patch tokens + linear head.

    python tools/eval_attentive.py runs/demo --which target
    python tools/eval_attentive.py runs/demo --lrs 1e-3 3e-4 --epochs 20 --json attentive.json

Same rule as the linear probe: lr / epochs chosen on a validation split carved from the labelled
train split, retrain, evaluate the test split once. (The official SCOTT evaluation selects on
the test split; this one does not.)
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from scott.cli import run_cli  # noqa: E402
from scott.eval.attentive import DEFAULT_LRS, attentive_grid, attentive_probe  # noqa: E402
from scott.eval.runs import (  # noqa: E402
    add_source_args, command_line, default_cache_dir, log_probe_candidate, probe_features, report_probe,
    resolve_device, source_from_args,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(parser)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="AdamW learning-rate grid")
    parser.add_argument("--epochs", type=int, nargs="+", default=[20], help="epoch grid")
    parser.add_argument("--heads", type=int, default=4, help="attention heads of the pooling [4]")
    parser.add_argument("--queries", type=int, default=1, help="learned queries [1]")
    parser.add_argument("--probe-batch-size", type=int, default=128, help="probe mini-batch [128]")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="probe weight decay [0.05]")
    parser.add_argument("--val-fraction", type=float, default=None, help="default: the recipe's data.val_fraction")
    parser.add_argument("--refit", choices=["train", "train+val"], default="train+val")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: RUN_DIR/cache/features)")
    parser.add_argument("--no-cache", action="store_true", help="do not cache features")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    console = Console()
    if any(lr <= 0 for lr in args.lrs) or any(e < 1 for e in args.epochs) or args.heads < 1 or args.queries < 1:
        console.print("[red]error:[/] --lrs must be > 0, --epochs / --heads / --queries >= 1")
        return 2
    source = source_from_args(args)
    device = resolve_device(args.device)
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir(source))
    train, test = probe_features(source, "tokens", args.batch_size, device, cache, args.limit_train,
                                 args.limit_test, args.seed, args.num_workers)
    dim = train.features.shape[-1]
    if dim % args.heads:
        console.print(f"[red]error:[/] feature dim {dim} is not divisible by --heads {args.heads}")
        return 2
    val_fraction = args.val_fraction or float(source.recipe["data"]["val_fraction"])
    grid = attentive_grid(args.lrs, args.epochs, args.probe_batch_size, args.weight_decay, args.heads, args.queries)
    result = attentive_probe(train, test, grid=grid, val_fraction=val_fraction, seed=args.seed,
                             refit=args.refit, device=device, on_result=log_probe_candidate(console))
    return report_probe("eval_attentive", "attentive", "attentive probe", source, result, args,
                        command_line(__file__, argv), len(train), len(test), val_fraction, "tokens", console)


if __name__ == "__main__":
    run_cli(main)
