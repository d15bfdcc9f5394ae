"""Graceful interruption: SIGTERM and Ctrl-C become a stop request honoured at a step boundary.

Schedulers send SIGTERM before they preempt a job; a user presses Ctrl-C (SIGINT). Inside
:class:`StopRequest` neither kills the process: the handler only records the signal, the
training loop finishes the current step, writes a checkpoint and raises
:class:`TrainingInterrupted`, which the CLI turns into one line saying where the checkpoint is
and how to resume, with exit status ``128 + signal`` (143 for SIGTERM, 130 for SIGINT). A
second Ctrl-C quits at once (``KeyboardInterrupt``), leaving the last complete checkpoint.

DataLoader workers ignore both signals (:func:`ignore_in_worker`): a Ctrl-C reaches the whole
foreground process group, and a worker killed mid-step would break the step being finished.
Workers still exit when the main process does.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

__all__ = ["StopRequest", "TrainingInterrupted", "ignore_in_worker"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after a completed step, with a checkpoint of that step."""

    def __init__(self, signum: int, step: int, total: int, checkpoint: Path | None, is_main: bool = True):
        self.signum, self.step, self.total, self.checkpoint, self.is_main = signum, step, total, checkpoint, is_main
        self.exit_status = 128 + int(signum)
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step} of {total}, checkpoint written to "
                         f"{checkpoint}")


class StopRequest:
    """Context manager turning SIGTERM / SIGINT into a flag (``signum``) read between steps.

    Handlers are installed only in the main thread (elsewhere the context does nothing) and the
    previous ones are restored on exit.
    """

    def __init__(self, log=None):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    __enter__ = install

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            self._log(f"{signal.Signals(signum).name} received: finishing the current step, then writing a "
                      "checkpoint (Ctrl-C again quits at once)")


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the main process decides when to stop."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
