"""Every error a user can meet, each with its exit code: a contract with job scripts and schedulers.

    python -c "import dtrain.errors as e; print(e.EXIT_CODES)"

``launch/slurm/train.sbatch`` reads the ``EXIT_*`` lines below (it requeues on ``EXIT_PREEMPTED``), and the
README's table lists them. Every ``launch/`` script runs its work inside :func:`exit_on_error`, which turns these
exceptions into one ``dtrain: error: ...`` line on stderr and the code, instead of a traceback from every rank.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRAINING_STOPPED = 3
EXIT_RUN_DIR_BUSY = 16
EXIT_DISK_FULL = 28
EXIT_PREEMPTED = 75
EXIT_HUNG = 86

EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_BAD_INPUT: "bad config or data: nothing was trained (the message names the key, file, line or sample and the fix)",
    EXIT_TRAINING_STOPPED: "training stopped: too many non-finite steps, out of memory, a rank died, or a failed export check",
    EXIT_RUN_DIR_BUSY: "output_dir is in use by another job (the message names it: host, PID, job id, since when); nothing was written",
    EXIT_DISK_FULL: "no space left on the filesystem (or over quota): the message names the path, the bytes free and needed",
    EXIT_PREEMPTED: "preempted: a complete checkpoint was saved on a signal; requeue to resume (EX_TEMPFAIL)",
    EXIT_HUNG: "a rank made no progress for train.step_timeout_minutes (a dead peer or a hung collective)",
}


class DtrainError(Exception):
    """Base of the errors below; ``exit_code`` is what the entry point exits with.

    ``every_rank=True`` marks an error every rank raises with the same message (agreed through a collective):
    rank 0 alone prints it, so the user reads one line, not one per rank.
    """

    exit_code = EXIT_TRAINING_STOPPED

    def __init__(self, *args, every_rank: bool = False):
        super().__init__(*args)
        self.every_rank = every_rank


class ConfigError(DtrainError, ValueError):
    """A configuration that cannot run, with the fix in the message."""

    exit_code = EXIT_BAD_INPUT


class DataError(DtrainError, ValueError):
    """Input data that cannot be trained on: the message names the file, line or sample, and the fix."""

    exit_code = EXIT_BAD_INPUT


class TrainingError(DtrainError, RuntimeError):
    """Training cannot go on safely (too many bad steps, out of memory, a dead peer)."""

    exit_code = EXIT_TRAINING_STOPPED


class PeerLost(TrainingError):
    """A collective failed because another rank died or lost its connection: a consequence, not the cause.

    The cause is that rank's own error (a hang, a crash, a kill). A training rank that raises this waits
    ``grace_s`` before it exits (:func:`dtrain.dist.exit_rank_on_error`), so that DeepSpeed's launcher, which exits
    with the code of the first failed rank it polls (once a second), reports the cause's code (86: hung, 2: bad
    data, ...) rather than this 3.
    """

    grace_s = 5.0


class ExportError(DtrainError, RuntimeError):
    """The exported model is missing tensors or does not reproduce the engine's logits."""

    exit_code = EXIT_TRAINING_STOPPED


class DiskFull(DtrainError):
    """A write that cannot finish for lack of space (ENOSPC, EDQUOT, or a free-space check before it started).

    What was being written is left incomplete-looking (a ``.partial`` or temporary name, never the final one).
    """

    exit_code = EXIT_DISK_FULL


class RunDirBusy(DtrainError):
    """Another live job holds ``output_dir``'s lock: two writers would mix their checkpoints and metrics."""

    exit_code = EXIT_RUN_DIR_BUSY


class Preempted(DtrainError):
    """Raised after the preemption checkpoint is complete on every rank."""

    exit_code = EXIT_PREEMPTED


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Turn a :class:`DtrainError` into its one-line message on stderr and its exit code (``SystemExit``)."""
    try:
        yield
    except Preempted as e:
        print(f"dtrain: {e}; exit code {e.exit_code} (requeue)", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except DtrainError as e:
        if not (e.every_rank and os.environ.get("RANK", "0") != "0"):
            print(f"dtrain: error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except OSError as e:
        # A full disk met by a write no writer wrapped (a small file, a log): still one line and its code.
        from dtrain.disk import is_no_space, no_space_error

        if not is_no_space(e):
            raise
        print(f"dtrain: error: {no_space_error(e.filename or '.', 'a write', None)}", file=sys.stderr)
        raise SystemExit(EXIT_DISK_FULL) from None
