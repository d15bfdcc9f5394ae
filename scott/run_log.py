"""What a pretraining run reports while it runs: metrics.jsonl + TensorBoard, the rich progress
bar, the collapse watch, and the summary table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from scott.run_folder import METRICS_FILE

__all__ = ["MetricsLog", "Progress", "CollapseWatch", "summary_table", "DIAGNOSTICS", "COLLAPSE_TARGET_STD"]

# The objective's per-step diagnostics written to metrics.jsonl and TensorBoard.
DIAGNOSTICS = ("pred_std", "target_std", "target_abs", "dino_loss", "var_term", "cov_term")

# Targets are LayerNorm-ed tokens (or normalised patches): their per-channel spread across the
# batch's tokens is 0.5-0.7 on the demo (random init and trained alike). Below this the run warns.
COLLAPSE_TARGET_STD = 0.05


class CollapseWatch:
    """Warns once when the targets' spread (``target_std``) falls toward zero.

    A collapsing run maps every patch to the same target; the predictor then wins by predicting a
    constant and the loss looks excellent. ``check`` returns the warning the first time
    ``target_std < threshold``, ``None`` otherwise.
    """

    def __init__(self, threshold: float = COLLAPSE_TARGET_STD):
        self.threshold, self.warned = float(threshold), False

    def check(self, step: int, stats: Mapping[str, float]) -> str | None:
        value = stats.get("target_std")
        if self.warned or value is None or not value < self.threshold:
            return None
        self.warned = True
        return (f"warning: at step {step} the targets' spread (target_std) is {value:.3g}, below "
                f"{self.threshold}: the representation is collapsing (every patch gets the same target). "
                "Lower optim.lr, raise objective.ema_start, or check the masks.")


class MetricsLog:
    """metrics.jsonl + TensorBoard on the main process; no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, log_every: int):
        self.enabled, self.log_every = enabled, max(1, int(log_every))
        self.file = self.tb = None
        if enabled:
            self.file = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:  # tensorboard missing: the jsonl file is the record
                self.tb = None

    def write(self, record: Mapping[str, Any], tb_every: bool = True) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = int(record["step"])
        if self.tb is not None and (not tb_every or step % self.log_every == 0 or step == 1):
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"pretrain/{key}", value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


class Progress:
    """rich progress bar on the main process (steps, loss, images/s, ETA)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = self.task = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self.task = self.bar.add_task("pretrain", total=total, completed=start, loss="-", ips="-")
            self.bar.start()

    def update(self, step: int, loss: float, ips: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", ips=f"{ips:.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def summary_table(summary: Mapping[str, Any]):
    """A rich table of :func:`scott.train.pretrain`'s summary (the CLI prints it)."""
    from rich.table import Table

    table = Table(title="pretraining summary")
    table.add_column("item")
    table.add_column("value")
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(str(key), str(value))
    return table
