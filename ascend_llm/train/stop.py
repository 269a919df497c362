"""Stopping a training run on SIGINT or SIGTERM without losing work.

While `StopSignals` is active (the trainer's step loop), the first SIGINT or SIGTERM is only recorded and announced
on stderr; the handlers then go back to the default, so a second signal aborts at once (nothing is torn: the
checkpoint writer works in a temporary directory and renames it into place). After each step every rank asks
`StopAgreement.agree` whether any rank received a signal (one all-reduce of two flags per step, every rank, so
all ranks stop after the same step); the trainer then checkpoints that step through the normal path and raises
`TrainingStopped`, which the CLI prints in one line and turns into the conventional exit status 128 + signal
number (130 for SIGINT, 143 for SIGTERM).

A signal that arrives while the first step compiles is recorded like any other: the compile and the first step
finish (MindSpore's compiler cannot be interrupted from Python), then the run checkpoints step 1 and stops. The
announcement says so at once, and a second signal aborts without waiting.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

import numpy as np

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Raised by the trainer after a signal stopped the run: `signum` (SIGINT/SIGTERM), `step` (optimizer steps
    done), `checkpoint` (the newest checkpoint directory: this step's, or the last finite one after a non-finite
    step; None when there is none), `rank` (this process's; the CLI prints the line on rank 0 only)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, rank: int = 0):
        self.signum, self.step, self.checkpoint, self.rank = int(signum), int(step), checkpoint, rank
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (no finite state yet)"
        super().__init__(f"stopped by {signal.Signals(self.signum).name} at step {step}; {where}; resume with "
                         "train.resume=auto")

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + self.signum

    def one_line(self) -> str:
        return str(self)


class StopSignals:
    """Context manager: record the first SIGINT/SIGTERM in `received` (the signal number) instead of dying.

    Only the main thread can own signal handlers; elsewhere (a server thread calling the trainer) this does
    nothing and signals keep their behaviour. The previous handlers come back on exit."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        for s in self.signals:  # the second signal gets the default action: abort at once
            signal.signal(s, signal.SIG_DFL)
        name = signal.Signals(signum).name
        os.write(2, f"[ascend_llm] {name} received: stopping after the current step with a checkpoint "
                    f"(send it again to abort at once)\n".encode())


class StopAgreement:
    """Which signal, if any, stops the run after this step: the same answer on every rank.

    World size 1: this process's own signal. Otherwise one all-reduce (sum) over every rank of the flags
    [SIGINT received, SIGTERM received]: SIGTERM wins over SIGINT, so every rank also exits with the same status.
    `agree` and `barrier` are collectives: every rank calls them, in the same order."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._reduce = None
        if world_size > 1:
            from ascend_llm.parallel.comm import AllReduce, world_group

            self._reduce = AllReduce(world_group(), "sum")

    def agree(self, received: int | None) -> int | None:
        """The agreed stop signal (SIGTERM, SIGINT) or None to go on; `received`: this rank's signal."""
        if self._reduce is None:
            return received
        flags = np.array([received == signal.SIGINT, received == signal.SIGTERM], np.float32)
        total = self._sum(flags)
        if total[1] > 0:
            return int(signal.SIGTERM)
        return int(signal.SIGINT) if total[0] > 0 else None

    def barrier(self) -> None:
        """Return once every rank got here (after the main rank wrote the stop checkpoint: no rank exits, and so
        no launcher kills the others, before the checkpoint is on disk)."""
        if self._reduce is not None:
            self._sum(np.zeros(2, np.float32))

    def _sum(self, flags: np.ndarray) -> np.ndarray:
        from mindspore import Tensor

        return self._reduce(Tensor(flags)).asnumpy()
