"""Self-supervised pretraining on Hugging Face Accelerate: ``pretrain(recipe, output_dir, resume)``.

Data order, masks and schedules are pure functions of ``(seed, global step)``, so a resumed run
repeats an uninterrupted one exactly:

* :class:`StepSampler` cuts the global batch of step ``s`` out of a permutation seeded by
  ``(seed, epoch)`` (drop_last) and splits it into ``num_processes * accum_steps`` shards; shard
  ``k = rank * accum_steps + micro`` is one micro-batch of one process. The global batch of a step
  does not depend on how many processes / accumulation steps share it.
* Masks of a micro-batch come from ``masks_for_step(gen, b, seed, step, k)`` (same shard id),
  drawn by the loader's collator (``scott.mask_collator``), so 2 processes x 1 micro-batch and
  1 process x 2 micro-batches see identical data and masks.
* LR, weight decay and EMA momentum are set by hand every optimiser step from the global step
  (``scott.schedules``); there is no prepared LR scheduler.
* A checkpoint holds the objective's weights (safetensors), the optimiser (and fp16 scaler)
  state and every process's RNG state (``torch.load(weights_only=True)`` files), see
  ``scott.checkpoint``.

A non-finite loss stops the run *before* the optimiser step with :class:`NonFiniteLossError`
naming the step; no checkpoint of that state is written, earlier ones stay intact.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn

from scott import checkpoint as ck
from scott.interrupt import StopRequest, TrainingInterrupted, ignore_in_worker
from scott.mask_collator import MaskCollator, StepItems
from scott.optim_groups import adamw, param_groups
from scott.eval.online import compare_with_random_init, knn_monitor, knn_sets  # noqa: F401  (re-exported)
from scott.run_folder import (CONTEXT_ENCODER_FILE, ENCODER_FILE, MODEL_FILE, OPTIMIZER_FILE,
                              SCALER_FILE, RunDirError, prepare_run_dir, resolve_output_dir)
from scott.run_log import DIAGNOSTICS, CollapseWatch, MetricsLog, Progress
from scott.step_sampler import ProcessBatches, StepSampler  # noqa: F401  (re-exported)

__all__ = [
    "StepSampler",
    "ProcessBatches",
    "NonFiniteLossError",
    "CheckpointWriteError",
    "RunDirError",
    "PretrainRun",
    "pretrain",
    "resolve_output_dir",
    "knn_sets",
    "knn_monitor",
    "compare_with_random_init",
    "build_components",
    "Components",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN / inf; the run stopped before applying that step."""

    def __init__(self, step: int, epoch: int, value: float, last_checkpoint: Path | None):
        self.step, self.epoch, self.value, self.last_checkpoint = step, epoch, value, last_checkpoint
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"non-finite loss ({value}) at step {step} (epoch {epoch}); stopped before the optimiser "
            f"step and saved nothing of this state; {kept}. Lower optim.lr or set optim.grad_clip.")


class CheckpointWriteError(ck.CheckpointError):
    """A checkpoint could not be written (e.g. disk full); earlier complete ones are intact."""

    def __init__(self, step: int, folder: Path, exc: OSError, last_checkpoint: Path | None):
        self.step, self.last_checkpoint = step, last_checkpoint
        reason = exc.strerror or str(exc)
        kept = (f"the previous complete checkpoint {last_checkpoint} is intact; free space, then rerun with "
                "--resume to continue from it" if last_checkpoint else
                "no earlier checkpoint exists; free space and start again")
        super().__init__(f"cannot write the checkpoint of step {step} into {folder.parent} ({reason}); "
                         f"stopped, {kept}")


# ----------------------------------------------------------------------------- helpers
def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(context images, target images, extra view or None) from the pretraining collate."""
    if isinstance(batch, Mapping):
        ctx = batch.get("context", batch.get("images_ctx"))
        tgt = batch.get("target", batch.get("images_tgt", ctx))
        return ctx, tgt, batch.get("extra")
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], batch[0], None
        return batch[0], batch[1], (batch[2] if len(batch) > 2 else None)
    return batch, batch, None


@dataclass
class Components:
    """What one pretraining run is made of (built by :func:`build_components`)."""

    objective: nn.Module
    dataset: Any                       # indexable by (epoch, index)
    num_samples: int
    mask_fn: Callable[[int, int, int, int], Any]   # (batch, seed, step, shard) -> MaskBatch / visible
    eval_transform_spec: dict | None
    collate_fn: Callable | None = None


def build_components(recipe: Mapping) -> Components:
    """Objective, pretraining dataset (two seeded views per image) and mask function."""
    from scott.data import (PretrainDataset, build_pretrain_dataset, build_pretrain_transform,
                            check_dataset_size, eval_transform_spec)
    from scott.masks import StepMasks, build_mask_generator
    from scott.objectives import build_objective

    model_cfg = recipe["model"]
    grid = (model_cfg["img_size"] // model_cfg["patch_size"],) * 2
    gen = build_mask_generator(recipe["mask"], grid)
    base = build_pretrain_dataset(recipe["data"], in_chans=model_cfg["in_chans"])
    check_dataset_size(base, int(recipe["optim"]["batch_size"]), "pretraining data")
    dataset = PretrainDataset(base, build_pretrain_transform(recipe), seed=int(recipe["train"]["seed"]))
    objective = build_objective(recipe)

    mask_fn = StepMasks(gen, int(recipe["objective"]["num_masks"]))  # context masks per image
    return Components(objective=objective, dataset=dataset, num_samples=len(dataset), mask_fn=mask_fn,
                      eval_transform_spec=eval_transform_spec(model_cfg))


def _labelled(dataset) -> bool:
    """Whether the pretraining images carry labels (a custom dataset without ``labels`` counts as labelled)."""
    from scott.data.datasets import has_labels

    base = getattr(dataset, "base", dataset)
    return has_labels(base) if hasattr(base, "labels") else True


def _encoders(objective: nn.Module) -> dict[str, nn.Module]:
    """{"target": ..., "context": ...} encoders of an (unwrapped) objective.

    "target" is what the objective exports for evaluation (the EMA target encoder of MIM-JEPA,
    the context encoder of objectives without a target encoder).
    """
    context = objective.context_encoder
    export = getattr(objective, "export_encoder", None)
    return {"target": export() if export is not None else context, "context": context}


# ----------------------------------------------------------------------------- the run
class PretrainRun:
    """One pretraining run: set-up, steps, checkpoints, exports. :func:`pretrain` drives it."""

    def __init__(self, recipe: Mapping, output_dir: str | Path, accelerator=None,
                 components: Components | None = None, log: Callable[[str], None] | None = None):
        from accelerate import Accelerator

        self.recipe = recipe
        self.run_dir = Path(output_dir)
        optim, train = recipe["optim"], recipe["train"]
        if train["deterministic"]:
            from scott.determinism import enable_deterministic

            enable_deterministic()
        self.accum = int(optim["accum_steps"])
        if accelerator is None:
            accelerator = Accelerator(mixed_precision=train["mixed_precision"],
                                      gradient_accumulation_steps=self.accum)
        else:
            accelerator.gradient_accumulation_steps = self.accum
        self.acc = accelerator
        self.log = log or (lambda msg: self.acc.print(msg))
        self.seed = int(train["seed"])
        world = self.acc.num_processes
        self.global_batch = int(optim["batch_size"])
        if self.global_batch % (world * self.accum):
            raise RunDirError(
                f"optim.batch_size={self.global_batch} (the global batch) is not divisible by "
                f"processes x accum_steps = {world} x {self.accum}")
        self.micro_batch = self.global_batch // (world * self.accum)

        torch.manual_seed(self.seed)  # identical initial weights on every process
        self.parts = components or build_components(recipe)
        self.sampler = StepSampler(self.parts.num_samples, self.global_batch, world * self.accum, self.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = int(train["max_steps"] or train["epochs"] * self.steps_per_epoch)

        objective = self.parts.objective
        groups = (objective.param_groups(float(optim["weight_decay"])) if hasattr(objective, "param_groups")
                  else param_groups(objective, float(optim["weight_decay"])))
        optimizer = adamw(groups, lr=float(optim["lr"]), betas=tuple(optim["betas"]))
        self.model, self.optimizer = self.acc.prepare(objective, optimizer)
        self.start_step = 0
        self.last_checkpoint: Path | None = None
        self.last_stats: dict[str, float] = {}

    # -- properties
    @property
    def objective(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    # -- schedules
    def schedule(self, step: int) -> dict[str, float]:
        from scott.schedules import lr_at, momentum_at, wd_at

        return {"lr": lr_at(step, self.total_steps, self.steps_per_epoch, self.recipe["optim"]),
                "wd": wd_at(step, self.total_steps, self.recipe["optim"]),
                "momentum": momentum_at(step, self.total_steps, self.recipe["objective"])}

    def _apply_schedule(self, sched: Mapping[str, float]) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = sched["lr"]
            group["weight_decay"] = sched["wd"] if group["apply_wd"] else 0.0

    # -- data
    def make_loader(self, start_step: int) -> Iterator:
        batches = ProcessBatches(self.sampler, self.acc.process_index, self.accum, start_step, self.total_steps)
        workers = int(self.recipe["data"]["num_workers"])
        loader = torch.utils.data.DataLoader(
            StepItems(self.parts.dataset), batch_sampler=batches, num_workers=workers,
            collate_fn=MaskCollator(self.parts.mask_fn, self.seed, self.parts.collate_fn),
            pin_memory=self.acc.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed),  # keeps the global RNG untouched
            worker_init_fn=ignore_in_worker if workers else None,  # the main process handles SIGTERM / Ctrl-C
            persistent_workers=False, prefetch_factor=4 if workers else None)
        return iter(loader)

    def agree_on_stop(self, signum: int | None) -> int | None:
        """The stop signal any process received (all processes stop at the same step)."""
        if self.acc.num_processes == 1:
            return signum
        flag = torch.tensor([int(signum or 0)], device=self.acc.device)
        agreed = int(self.acc.gather(flag).max())
        return agreed or None

    # -- one optimiser step
    def accumulate_gradients(self, step: int, batches: Iterator) -> tuple[torch.Tensor, float]:
        """Forward + backward of every micro-batch of ``step`` on this process.

        Returns (loss averaged over micro-batches and processes, seconds spent waiting on data).
        Leaves the (synchronised) gradients in the parameters; does not step. The objective's
        diagnostics of the step (``pred_std``, ``target_std``, ... averaged the same way) are
        left in :attr:`last_stats`.
        """
        device = self.acc.device
        loss_sum = torch.zeros((), device=device)
        stat_sums: dict[str, torch.Tensor] = {}
        wait = 0.0
        for micro in range(self.accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            shard = self.acc.process_index * self.accum + micro
            if (batch["step"], batch["shard"]) != (step, shard):
                raise RuntimeError(f"the loader delivered step {batch['step']} shard {batch['shard']} "
                                   f"for step {step} shard {shard}")
            ctx, tgt, extra = _split_batch(batch["views"])
            ctx = ctx.to(device, non_blocking=True)
            tgt = tgt.to(device, non_blocking=True)
            views = () if extra is None else (extra.to(device, non_blocking=True),)
            masks = batch["masks"].to(device)
            with self.acc.accumulate(self.model):
                loss, stats = self.model(ctx, tgt, masks, *views)
                loss_sum += loss.detach().float()
                for key in DIAGNOSTICS:
                    if key in stats:
                        value = torch.as_tensor(stats[key], device=device).detach().float()
                        stat_sums[key] = stat_sums.get(key, torch.zeros((), device=device)) + value
                self.acc.backward(loss)
            if self.acc.sync_gradients != (micro == self.accum - 1):
                raise RuntimeError("gradient accumulation is out of step with the accelerator "
                                   f"(micro-batch {micro + 1} of {self.accum})")
        mean = self.acc.reduce(loss_sum / self.accum, reduction="mean")
        if stat_sums:
            keys = sorted(stat_sums)
            values = self.acc.reduce(torch.stack([stat_sums[k] for k in keys]) / self.accum, reduction="mean")
            self.last_stats = dict(zip(keys, values.tolist()))
        else:
            self.last_stats = {}
        return mean, wait

    def optimizer_step(self, step: int, loss: torch.Tensor, momentum: float) -> None:
        """Guard against a non-finite loss, clip, step, zero the grads, update the EMA target."""
        value = float(loss)
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(step + 1, self.sampler.epoch_of(step), value, self.last_checkpoint)
        clip = self.recipe["optim"]["grad_clip"]
        if clip:
            self.acc.clip_grad_norm_(self.model.parameters(), float(clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update = getattr(self.objective, "update_target", None)
        if update is not None:
            update(momentum)

    # -- checkpoints
    def save_checkpoint(self, step: int) -> Path:
        """Write a complete checkpoint for ``step`` completed steps (collective call).

        Every file's sha256 is recorded in meta.json as it is written. A write that fails (disk
        full, ...) raises :class:`CheckpointWriteError`; the partial folder is removed and earlier
        complete checkpoints stay intact.
        """
        tmp = ck.pending_checkpoint_dir(self.run_dir, step)
        try:
            if self.is_main:
                ck.begin_checkpoint(self.run_dir, step)
            self.acc.wait_for_everyone()
            ck.save_torch_state(tmp / f"rng_rank{self.acc.process_index}.pt", ck.capture_rng_state(),
                                note_digest=True)
            if self.is_main:
                ck.save_tensors(tmp / MODEL_FILE, self.objective.state_dict(), note_digest=True)
                ck.save_torch_state(tmp / OPTIMIZER_FILE, self.optimizer.state_dict(), note_digest=True)
                if self.acc.scaler is not None:
                    ck.save_torch_state(tmp / SCALER_FILE, self.acc.scaler.state_dict(), note_digest=True)
            self.acc.wait_for_everyone()
            path = ck.checkpoints_root(self.run_dir) / ck.checkpoint_name(step)
            if self.is_main:
                meta = {"epoch": self.sampler.epoch_of(step), "total_steps": self.total_steps,
                        "global_batch": self.global_batch, "num_processes": self.acc.num_processes,
                        "accum_steps": self.accum, "seed": self.seed, "num_samples": self.sampler.num_samples,
                        "recipe_name": self.recipe.get("name"), "time": time.time()}
                path = ck.finish_checkpoint(self.run_dir, step, meta,
                                            keep=int(self.recipe["train"]["keep_checkpoints"]), log=self.log)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(step, tmp, exc, self.last_checkpoint) from None
        self.acc.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: Path) -> int:
        """Restore weights, optimiser, scaler and RNG from ``path``; returns its step."""
        meta = ck.read_meta(path)
        for key, mine in (("global_batch", self.global_batch), ("seed", self.seed),
                          ("num_samples", self.sampler.num_samples)):
            if meta.get(key) != mine:
                raise RunDirError(f"cannot resume from {path}: its {key} is {meta.get(key)}, this run has {mine} "
                                  "(the data order would differ)")
        tensors, _ = ck.load_tensors(path / MODEL_FILE)
        self.objective.load_state_dict(tensors, strict=True)
        self.optimizer.load_state_dict(ck.load_torch_state(path / OPTIMIZER_FILE))
        if self.acc.scaler is not None and (path / SCALER_FILE).is_file():
            self.acc.scaler.load_state_dict(ck.load_torch_state(path / SCALER_FILE))
        rng_file = path / f"rng_rank{self.acc.process_index}.pt"
        if meta.get("num_processes") == self.acc.num_processes and rng_file.is_file():
            ck.restore_rng_state(ck.load_torch_state(rng_file))
        else:
            self.log(f"note: {path} was written by {meta.get('num_processes')} processes, this run has "
                     f"{self.acc.num_processes}: the data order is kept, masks are kept only if processes x "
                     "accum_steps is unchanged, RNG streams start afresh")
        self.last_checkpoint = path
        return int(meta["step"])

    # -- exports
    def export_encoders(self, step: int) -> dict[str, Path]:
        """encoder.safetensors (target) and context_encoder.safetensors (main process writes)."""
        paths = {"target": self.run_dir / ENCODER_FILE, "context": self.run_dir / CONTEXT_ENCODER_FILE}
        if self.is_main:
            for which, encoder in _encoders(self.objective).items():
                ck.export_encoder(paths[which], encoder.state_dict(), self.recipe["model"],
                                  self.parts.eval_transform_spec,
                                  extra={"which": which, "step": step, "recipe": self.recipe.get("name"),
                                         "objective": self.recipe["objective"]["name"]})
        self.acc.wait_for_everyone()
        return paths


# ----------------------------------------------------------------------------- run folder files
# ----------------------------------------------------------------------------- entry point
def pretrain(recipe: Mapping, output_dir: str | Path, resume: bool = False, accelerator=None,
             components: Components | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pretrain the recipe's objective; write the run folder; return a summary dict (printing it
    is the caller's choice: ``scott.run_log.summary_table``).

    ``components`` replaces the library-built objective/data/masks (tests, experiments). ``log``
    receives the run's notes and warnings (default: printed by the main process).
    Raises :class:`NonFiniteLossError` on NaN/inf loss, :class:`RunDirError` for an unusable
    output folder, ``scott.checkpoint.CheckpointError`` when resuming finds only torn checkpoints,
    :class:`CheckpointWriteError` when a checkpoint cannot be written, and
    :class:`scott.interrupt.TrainingInterrupted` after SIGTERM / Ctrl-C (the step in progress is
    finished and checkpointed first; ``--resume`` continues bit-identically).
    """
    run = PretrainRun(recipe, output_dir, accelerator, components, log=log)
    train_cfg = recipe["train"]
    start = run.start_step = prepare_run_dir(run, resume)
    total = run.total_steps
    every = int(train_cfg["checkpoint_every"])
    monitor_every = int(train_cfg["monitor_every"])
    described = getattr(getattr(run.parts.dataset, "base", None), "description", None)
    if described and start == 0:
        run.log(f"pretraining data: {run.parts.num_samples} images, {described}")
    labelled = _labelled(run.parts.dataset)
    if monitor_every and not labelled:
        run.log("note: the pretraining images have no labels (no class folders), so the kNN monitor "
                "(train.monitor_every) is off")
        monitor_every = 0
    metrics = MetricsLog(run.run_dir, run.is_main, start, train_cfg["log_every"])
    progress = Progress(run.is_main, total, start)
    collapse = CollapseWatch()
    run.model.train()
    stopper = StopRequest(log=run.log).install()  # SIGTERM / Ctrl-C: stop after the current step
    batches = run.make_loader(start)
    t_start = time.perf_counter()
    images = 0
    loss_value = float("nan")
    knn_last = monitor_sets = None
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            sched = run.schedule(step)
            run._apply_schedule(sched)
            loss, wait = run.accumulate_gradients(step, batches)
            run.optimizer_step(step, loss, sched["momentum"])
            done = step + 1
            loss_value = float(loss)
            dt = time.perf_counter() - t0
            images += run.global_batch
            ips = run.global_batch / max(dt, 1e-9)
            record = {"step": done, "epoch": run.sampler.epoch_of(step), "loss": loss_value, "lr": sched["lr"],
                      "wd": sched["wd"], "momentum": sched["momentum"], "images_per_s": ips, "data_wait_s": wait,
                      **run.last_stats}
            warning = collapse.check(done, run.last_stats)
            if warning:
                run.log(warning)
            epoch_end = done % run.steps_per_epoch == 0
            if monitor_every and epoch_end and (done // run.steps_per_epoch) % monitor_every == 0:
                if run.is_main:
                    monitor_sets = monitor_sets or knn_sets(recipe, "val")
                    knn_last = knn_monitor(_encoders(run.objective)["target"], recipe, run.parts.eval_transform_spec,
                                           device=run.acc.device, sets=monitor_sets)
                    record["knn_top1"] = knn_last
                run.model.train()
                run.acc.wait_for_everyone()
            metrics.write(record)
            progress.update(done, loss_value, ips)
            if done % every == 0 or done == total:
                run.save_checkpoint(done)
            signum = run.agree_on_stop(stopper.signum)
            if signum:
                if run.last_checkpoint is None or ck.checkpoint_step(run.last_checkpoint) != done:
                    run.save_checkpoint(done)
                raise TrainingInterrupted(signum, done, total, run.last_checkpoint, run.is_main)
    finally:
        stopper.restore()
        progress.close()
        metrics.close()
    if total <= start and run.last_checkpoint is None:
        run.save_checkpoint(total)
    paths = run.export_encoders(total)
    wall = time.perf_counter() - t_start
    summary = {"output_dir": str(run.run_dir), "steps": total, "start_step": start,
               "epochs": total / run.steps_per_epoch, "final_loss": loss_value,
               "images_per_s": images / wall if wall > 0 else 0.0, "wall_s": wall,
               "processes": run.acc.num_processes, "global_batch": run.global_batch,
               "is_main_process": run.is_main, "device": str(run.acc.device),
               "encoder": str(paths["target"]), "context_encoder": str(paths["context"]),
               "last_checkpoint": str(run.last_checkpoint), "labelled": labelled}
    if knn_last is not None:
        summary["knn_top1_monitor"] = knn_last
    return summary
