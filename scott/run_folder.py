"""The run folder of a pretraining run: its file names, where it is, and how a (resumed) run
takes it over (recipe.yaml written, metrics newer than the resumed checkpoint dropped, notes
about a changed recipe or an EMA too slow for the run's length)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

from scott import checkpoint as ck

__all__ = ["RunDirError", "resolve_output_dir", "prepare_run_dir", "truncate_metrics", "MODEL_FILE",
           "OPTIMIZER_FILE", "SCALER_FILE", "METRICS_FILE", "RECIPE_FILE", "ENCODER_FILE",
           "CONTEXT_ENCODER_FILE", "EMA_INITIAL_SHARE_NOTE"]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCALER_FILE = "scaler.pt"
METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"
ENCODER_FILE = "encoder.safetensors"
CONTEXT_ENCODER_FILE = "context_encoder.safetensors"


class RunDirError(ValueError):
    """The output folder cannot be used as asked (e.g. it holds a run and --resume is missing)."""


def resolve_output_dir(recipe: Mapping, output: str | Path | None = None) -> Path:
    """``output`` if given, else ``train.output_dir``, else ``runs/<recipe name>``."""
    if output:
        return Path(output)
    if recipe["train"].get("output_dir"):
        return Path(recipe["train"]["output_dir"])
    return Path("runs") / str(recipe.get("name", "run"))


def prepare_run_dir(run, resume: bool) -> int:
    """Check the folder, restore the last complete checkpoint if resuming; returns the start step.

    ``run`` is a :class:`scott.train.PretrainRun` (its folder, accelerator, log and checkpoint
    loader). Writes recipe.yaml, drops metric lines newer than the resumed step.
    """
    from scott.config import format_recipe

    run_dir = run.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a folder; choose another --output")
    start = 0
    if resume:
        last = ck.find_last_complete(run_dir, log=run.log)
        if last is None:
            run.log(f"--resume: no checkpoint in {run_dir}, starting from step 0")
        else:
            start = run.load_checkpoint(last)
            run.log(f"resuming from {last} (step {start} of {run.total_steps})")
            warn_recipe_change(run, run_dir / RECIPE_FILE)
    elif ck.list_checkpoints(run_dir):
        raise RunDirError(f"{run_dir} already holds checkpoints of a run; pass --resume to continue it "
                          "or choose another --output")
    run.acc.wait_for_everyone()
    if run.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent is a file, no permission, read-only file system
            raise RunDirError(f"cannot create the run folder {run_dir}: {exc.strerror or exc}; "
                              "choose another --output") from None
        ck.atomic_write_text(run_dir / RECIPE_FILE, format_recipe(run.recipe))
        truncate_metrics(run_dir / METRICS_FILE, start)
        if start == 0 and (run_dir / "tb").is_dir():  # events of an attempt that never checkpointed
            shutil.rmtree(run_dir / "tb")
    run.acc.wait_for_everyone()
    note_short_ema(run)
    return start


# Above this share of initial weights in the final EMA target, the run says so at its start.
EMA_INITIAL_SHARE_NOTE = 0.25


def note_short_ema(run) -> None:
    """Tell the user when the run is too short for the EMA target to leave its initialisation."""
    from scott.schedules import ema_initial_share

    if not hasattr(run.objective, "target_encoder"):
        return
    share = ema_initial_share(run.total_steps, run.recipe["objective"])
    if share > EMA_INITIAL_SHARE_NOTE:
        run.log(f"note: after {run.total_steps} steps the EMA target encoder (momentum "
                f"{run.recipe['objective']['ema_start']} -> {run.recipe['objective']['ema_end']}) still keeps "
                f"{100 * share:.0f} % of its initial weights; the exported encoder.safetensors will be close to "
                "random init. Run more steps (a smaller optim.batch_size or more epochs), lower "
                "objective.ema_start, or evaluate the context encoder (--which context).")


def warn_recipe_change(run, stored: Path) -> None:
    import yaml

    if not stored.is_file():
        return
    old = yaml.safe_load(stored.read_text(encoding="utf-8")) or {}
    changed = [f"{sec}.{key}" for sec, body in run.recipe.items() if isinstance(body, dict)
               for key, value in body.items() if (old.get(sec) or {}).get(key, value) != value]
    if changed:
        run.log(f"note: the recipe differs from the stored {stored.name} in: {', '.join(changed)}")


def truncate_metrics(path: Path, start_step: int) -> None:
    """Drop metric lines of steps after ``start_step`` (written after the resumed checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= start_step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    ck.atomic_write_text(path, "".join(f"{line}\n" for line in kept))
