"""Stopping and recovering a training run: SIGTERM / SIGINT requests (preemption, Ctrl-C),
steps whose loss or gradient norm is not finite (NaN policies), and a full disk."""
import contextlib
import enum
import errno
import os
import signal
import threading
from typing import Callable

import numpy as np

from t5x_lite import partitioning
from t5x_lite import startup

class NanPolicy(enum.Enum):
    """What training does after a step whose loss or gradient norm is not finite
    (run_config.LoopConfig.nan_policy)."""

    # Stop before any checkpoint holds the step's result.
    STOP = "stop"
    # No update (counted as skipped_steps); more than max_consecutive_skips in a row stop.
    SKIP = "skip"
    # Back to the newest checkpoint, then on with the next batches (max_rollbacks in a row).
    ROLLBACK = "rollback"


class StopRequest:
    """Records SIGTERM / SIGINT (preemption, Ctrl-C) while installed, so that training
    finishes the current step, saves a checkpoint and exits instead of dying mid-step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_number: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            startup.hand_over()
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _record(self, number: int, frame) -> None:
        self.signal_number = number

    def requested(self) -> bool:
        """Whether any process received a signal (a collective on multi-host runs)."""
        return partitioning.any_process(self.signal_number is not None)


class Preempted(SystemExit):
    """Training stopped on a signal after saving: exit status 128 + the signal number."""


class NonFiniteLoss(RuntimeError):
    """A training step's loss or gradient norm was NaN or infinite."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def check_finite(rows: list[dict], last_step: int, nan_policy: NanPolicy,
                 max_consecutive_skips: int, newest_checkpoint: Callable[[], int | None]
                 ) -> None:
    """Raises NonFiniteLoss for the first of `rows` (per-step metrics of the steps up to
    `last_step`) whose loss or gradient norm is not finite; under NanPolicy.SKIP only
    once the optimizer has skipped more than max_consecutive_skips steps in a row (then the
    parameters are already corrupt). Call it before any checkpoint of those steps is
    saved."""
    for index, row in enumerate(rows):
        step = last_step - len(rows) + 1 + index
        finite = np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"])
        if finite or (nan_policy is NanPolicy.SKIP
                      and row["consecutive_skips"] <= max_consecutive_skips):
            continue
        kept = newest_checkpoint()
        raise NonFiniteLoss(
            f"loss {row['loss']} and gradient norm {row['grad_norm']} at step {step}: "
            f"stopped before saving it (the newest checkpoint, step {kept}, is intact); "
            "lower the learning rate, or set t5x_lite.run_config.LoopConfig.nan_policy to 'skip' "
            "or 'rollback'", step)


class DiskFull(RuntimeError):
    """MODEL_DIR's file system ran out of space (or quota) while training wrote to it."""


FULL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_explained(model_dir: str, newest_checkpoint: Callable[[], int | None]):
    """Turns running out of space inside the block (a checkpoint save, metrics) into
    DiskFull naming the fix and the newest complete checkpoint, which a rerun resumes from;
    Orbax left the unfinished save under a temporary name, which restore skips."""
    try:
        yield
    except OSError as error:
        if error.errno not in FULL_DISK_ERRORS:
            raise
        kept = newest_checkpoint()
        resume = (f"from the newest complete checkpoint, step {kept}" if kept is not None
                  else "from the start (no checkpoint was completed)")
        raise DiskFull(f"no space left on the disk of {os.path.abspath(model_dir)} (writing "
                       f"{error.filename or 'a file'}): free space, then rerun the same "
                       f"command; it resumes {resume}") from error
