"""Self-supervised pretraining from a recipe.

    python tools/pretrain.py RECIPE [--output DIR] [--set section.key=value ...] [--resume] [--malloc-defaults]
    accelerate launch [--cpu --num_processes 2] tools/pretrain.py RECIPE ...

Writes the run folder (recipe.yaml, metrics.jsonl, tb/, checkpoints/, encoder.safetensors,
context_encoder.safetensors, export/). Afterwards the main process prints the kNN accuracy on the
evaluation split of the pretrained target and context encoders next to a random-init encoder of
the same recipe and raw pixels (skip with --no-knn; skipped for images without labels), and
writes export/: the encoder named by ``train.export_encoder`` (the EMA target by default; the CPU
demo recipes choose the context encoder on validation) as a shareable timm / Hugging Face model
folder whose model card carries those numbers (scott.from_pretrained, timm "local-dir:", docs/sharing.md).

Exit status: 0 done, 2 bad recipe or data / unusable output folder, 1 training stopped
(non-finite loss, unusable checkpoints, a checkpoint that could not be written, e.g. disk full),
143 / 130 stopped by SIGTERM / Ctrl-C after finishing and checkpointing the current step (the
message says how to resume; a second Ctrl-C quits at once).
"""

from __future__ import annotations

import argparse
import sys

from scott.cli import add_malloc_flag, apply_malloc_choice


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument("--output", default=None, help="run folder (default: train.output_dir or runs/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value (repeatable), e.g. --set optim.lr=1e-3")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--no-knn", action="store_true", help="skip the kNN report after pretraining")
    add_malloc_flag(parser)
    return parser.parse_args(argv)


def resume_command(argv, output) -> str:
    """This command with ``--resume`` (and the run folder made explicit)."""
    import shlex

    args = list(sys.argv[1:] if argv is None else argv)
    if "--output" not in args and not any(a.startswith("--output=") for a in args):
        args += ["--output", str(output)]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", "tools/pretrain.py", *args])


def main(argv=None) -> int:
    args = parse_args(argv)
    from scott.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # before the heavy imports: fail fast
    apply_malloc_choice(args)  # the step's activations are not page-faulted afresh every step
    from scott.checkpoint import CheckpointError
    from scott.train import NonFiniteLossError, RunDirError, pretrain, resolve_output_dir

    from scott.interrupt import TrainingInterrupted

    output = resolve_output_dir(recipe, args.output)
    try:
        summary = pretrain(recipe, output, resume=args.resume)
    except RunDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        if exc.is_main:
            print(f"error: {exc}; continue with: {resume_command(argv, output)}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"error: interrupted again, quit at once; the last complete checkpoint in {output / 'checkpoints'} "
              f"is kept; continue with: {resume_command(argv, output)}", file=sys.stderr)
        return 130
    if not summary.get("is_main_process", True):
        return 0
    from rich.console import Console

    from scott.run_log import summary_table

    Console().print(summary_table(summary))
    report = None if args.no_knn else knn_report(recipe, output, summary.get("device"), summary["labelled"])
    from scott.hub import export_pretrained

    shared = export_pretrained(output, output / "export", metrics={"knn": report} if report else None,
                               which=recipe["train"]["export_encoder"])
    print(f"shareable model folder (timm / Hugging Face layout): {shared}")
    return 0


def knn_report(recipe, output, device, labelled: bool):
    """Print the end-of-run kNN comparison and return it (``None`` when the images have no labels)."""
    from scott.train import compare_with_random_init

    if not labelled:
        print("kNN report skipped: the images have no labels (no class folders under data.root); "
              "embed them with tools/embed.py and look at them with tools/neighbours.py")
        return None
    report = compare_with_random_init(output, recipe, device=device)
    print(f"kNN top-1 (k={report['k']}, {report['pool']} pooling) on the {report['split']} split: "
          f"pretrained target encoder {100 * report['pretrained']:.2f} %, "
          f"pretrained context encoder {100 * report['pretrained_context']:.2f} %, "
          f"random init {100 * report['random_init']:.2f} %, raw pixels {100 * report['pixels']:.2f} %")
    return report

if __name__ == "__main__":
    from scott.cli import run_cli

    run_cli(main)
