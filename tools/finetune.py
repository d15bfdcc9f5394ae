#!/usr/bin/env python
"""End-to-end fine-tuning of an exported encoder + linear head (or of an untrained one).

    python tools/finetune.py runs/demo --epochs 10 --lr 1e-3 --layer-decay 0.75
    python tools/finetune.py --random-init recipes/demo.yaml --epochs 10     # supervised from scratch
    python tools/finetune.py runs/demo --probe-epochs 100 --lr 3e-4          # LP-FT: the head first
    accelerate launch --num_processes 2 tools/finetune.py runs/demo          # several GPUs

A validation split is carved from the labelled train split (data.val_fraction, stratified,
seeded); the model trains on the rest, the epoch with the best validation top-1 is kept, and the
test split is evaluated once with it (``--val-only``: never; for choosing the settings). The
model is scott's timm model (``ScottViT``, what
``timm.create_model("scott_vit_small", pretrained=True, pretrained_cfg_overlay=dict(file=...))``
builds), pooled as the recipe's ``model.global_pool`` (``flat`` in the CPU recipes: the head sees
every token in its place, as the probes do) unless ``--pool`` says otherwise; timm's own training
script builds the same model with ``global_pool=`` the same value.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from scott.cli import add_malloc_flag, apply_malloc_choice, run_cli  # noqa: E402
from scott.config import RecipeError  # noqa: E402
from scott.eval.features import EvalView, encoder_in_chans, resolve_transform  # noqa: E402
from scott.eval.finetune import finetune, seeded_init  # noqa: E402
from scott.eval.runs import (  # noqa: E402
    add_source_args, carve_validation_queries, command_line, dataset_labels, default_json_path, eval_bank,
    eval_datasets, limit_dataset, result_record, source_from_args, write_json,
)
from scott.eval.supervised import training_views  # noqa: E402
from scott.models.encoder import GLOBAL_POOLS  # noqa: E402
from scott.models.timm_family import ScottViT  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(parser)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs [10]")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW lr [1e-3]")
    parser.add_argument("--min-lr", type=float, default=1e-6, help="final lr of the cosine [1e-6]")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="linear warm-up epochs [1]")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay [0.05]")
    parser.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise lr decay (1 = off) [1.0]")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="[0.1]")
    parser.add_argument("--probe-epochs", type=int, default=0,
                        help="LP-FT: first train the head alone for this many epochs on the frozen "
                             "encoder's features (scored on validation as epoch 0, a candidate like "
                             "the fine-tuning epochs), then fine-tune everything [0 = off]")
    parser.add_argument("--probe-lr", type=float, default=1e-3, help="AdamW lr of the head stage [1e-3]")
    parser.add_argument("--no-fc-norm", action="store_true",
                        help="the head reads the pooled features directly (timm's fc_norm=False) instead "
                             "of through a LayerNorm; with --probe-epochs the head stage fits it on features "
                             "standardised per dimension, as the linear probe does, and folds that into it")
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips in training")
    parser.add_argument("--augment", choices=["flip", "recipe"], default="flip",
                        help="training views: random horizontal flips (unless --no-flip), or the "
                             "recipe's pretraining augmentation (its context view: crops, flips, "
                             "colour), as the supervised-from-scratch baseline of benchmarks/quality.py [flip]")
    parser.add_argument("--val-fraction", type=float, default=None, help="default: the recipe's data.val_fraction")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--val-only", action="store_true",
                        help="choose hyper-parameters: report the validation split only; the test "
                             "split is never built or read")
    parser.add_argument("--pool", choices=list(GLOBAL_POOLS), default=None,
                        help="how the head sees the tokens: avg (any input size) or a layout-keeping "
                             "pooling (grid2, grid3, flat: every token concatenated) [the recipe's "
                             "model.global_pool, as the probes]")
    add_malloc_flag(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    apply_malloc_choice(args)
    console = Console()
    if args.pixels:
        raise RecipeError("--pixels has nothing to fine-tune; use eval_linear.py --pixels for a pixel baseline")
    if args.epochs < 1 or args.lr <= 0 or not 0 < args.layer_decay <= 1:
        console.print("[red]error:[/] need --epochs >= 1, --lr > 0, 0 < --layer-decay <= 1")
        return 2
    if args.probe_epochs < 0 or args.probe_lr <= 0:
        console.print("[red]error:[/] need --probe-epochs >= 0 and --probe-lr > 0")
        return 2
    if args.no_flip and args.augment != "flip":
        console.print("[red]error:[/] --no-flip goes with --augment flip (the recipe's augmentation decides its own flips)")
        return 2
    from accelerate import Accelerator

    acc = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    args.device = str(acc.device)
    source = source_from_args(args)
    encoder = source.encoder.train()
    if args.val_only:
        train, test = eval_bank(source.recipe), None
    else:
        train, test = eval_datasets(source.recipe)
        test = limit_dataset(test, args.limit_test, args.seed)
    train = limit_dataset(train, args.limit_train, args.seed)
    val_fraction = args.val_fraction or float(source.recipe["data"]["val_fraction"])
    fit_part, val_part = carve_validation_queries(train, val_fraction, args.seed)
    transform, convert = resolve_transform(encoder, None)
    chans = encoder_in_chans(encoder)

    def view(ds):
        return EvalView(ds, transform, chans, convert)

    fit = training_views(fit_part, source.recipe, view, args.augment, args.seed, flip=not args.no_flip)
    val = view(val_part)
    num_classes = int(dataset_labels(train).max()) + 1
    # The timm model (timm.create_model("scott_vit_*") builds the same class), pooled as --pool says.
    with seeded_init(args.seed):  # the head's init depends on --seed alone
        model = ScottViT.from_encoder(encoder, num_classes, global_pool=args.pool, fc_norm=not args.no_fc_norm)
    result = finetune(model, fit, val, None if test is None else view(test), epochs=args.epochs,
                      lr=args.lr, min_lr=args.min_lr,
                      warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
                      weight_decay=args.weight_decay, layer_decay=args.layer_decay,
                      label_smoothing=args.label_smoothing, seed=args.seed, accelerator=acc,
                      num_workers=args.num_workers, log=console.log if acc.is_main_process else (lambda s: None),
                      probe_epochs=args.probe_epochs, probe_lr=args.probe_lr)
    if not acc.is_main_process:
        return 0
    t = result["test"]
    chosen = " (the head alone, encoder frozen)" if result["best_epoch"] == 0 else ""
    console.print(f"fine-tune {source.description}: best val epoch {result['best_epoch']}{chosen} "
                  f"(val top-1 {100 * result['val']['top1']:.2f} %, {result['n_val']} images carved from train)")
    if t is None:
        console.print("validation only (--val-only): the test split was not built")
    else:
        console.print(f"TEST ({result['n_test']} images, evaluated once): top-1 {100 * t['top1']:.2f} %  "
                      f"top-5 {100 * t['top5']:.2f} %  mean per class {100 * t['mean_per_class']:.2f} %")
    scores = ({"val_only": True} if t is None else
              {"top1": t["top1"], "top5": t["top5"], "mean_per_class": t["mean_per_class"]})
    record = result_record(
        "finetune", source, command_line(__file__, argv),
        args.seed, result["n_fit"] + result["n_val"], result["n_test"],
        {**scores, **result,
         "val_fraction": val_fraction},
        {"hyperparameters": {**{k: getattr(args, k) for k in (
            "epochs", "lr", "min_lr", "warmup_epochs", "weight_decay", "layer_decay", "label_smoothing",
            "batch_size", "no_flip", "augment", "mixed_precision", "probe_epochs", "probe_lr")},
            "fc_norm": model.use_fc_norm,
            "pool": model.global_pool},
         "num_processes": acc.num_processes, "limit_train": args.limit_train, "limit_test": args.limit_test},
    )
    out = args.json or default_json_path(source, "finetune")
    if out:
        console.print(f"results -> {write_json(out, record)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
