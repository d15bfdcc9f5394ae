"""Graceful interruption: SIGTERM and Ctrl-C become a stop request honoured at a step boundary.

Schedulers send SIGTERM before they preempt a job; a user presses Ctrl-C (SIGINT). Inside
:class:`StopRequest` neither kills the process: the handler only records the signal, the
training loop finishes the current step, writes a checkpoint and raises
:class:`TrainingInterrupted`, which the CLI turns into one line saying where the checkpoint is
and how to resume, with exit status ``128 + signal`` (143 for SIGTERM, 130 for SIGINT). A
second Ctrl-C quits at once (``KeyboardInterrupt``), leaving the last complete checkpoint.

DataLoader workers (:func:`ignore_in_worker`) ignore Ctrl-C, which reaches the whole foreground
process group, and ignore SIGTERM while the training loop runs (a scheduler signals every
process of the job; a worker killed mid-step would break the step being finished). Once the
loop has ended, a SIGTERM ends a worker again, as PyTorch's loader shutdown expects
(``terminate()`` of a worker that did not exit by itself); workers also exit when the main
process dies.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

__all__ = ["StopRequest", "TrainingInterrupted", "ignore_in_worker"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: Set when the training loop of this process has ended: workers forked from it may then be
#: terminated. (Inherited by forked workers; with "spawn" workers keep the default SIGTERM.)
_loop_ended = None


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
        global _loop_ended
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        _loop_ended = self._loop_ended = multiprocessing.Event()
        return self

    def restore(self) -> None:
        """Put the previous handlers back and let this loop's workers be terminated again."""
        if getattr(self, "_loop_ended", None) is not None:
            self._loop_ended.set()
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def _worker_sigterm(signum, frame) -> None:
    """SIGTERM in a worker: ignored while the training loop runs, else the default (exit)."""
    ended = _loop_ended
    if ended is None or ended.is_set():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
