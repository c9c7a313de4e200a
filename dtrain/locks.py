"""Lock files on a (possibly shared) filesystem: who holds them, whether that holder is alive, and a heartbeat.

    <output_dir>/dtrain.lock           one writer per run directory (global rank 0 of the job holds it)
    <cache_dir>/<key>.lock             one process prepares a token store; others of the same job wait at a barrier

A lock is a small JSON file created with ``O_EXCL``: host, PID (and the PID's start time, so a reused PID is not
taken for the holder), the scheduler's job id, since when, the last heartbeat and a token. The holder rewrites
the heartbeat every ``HEARTBEAT_S`` seconds from a thread. A lock whose holder is dead is taken over with a
warning: on the same host when the PID is gone; from another host when the heartbeat is older than ``STALE_S``
(or the holder was an earlier attempt of the same requeued SLURM job). A killed job never blocks its resubmission.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

log = logging.getLogger("dtrain")

HEARTBEAT_S = 30.0
STALE_S = 300.0
"""A holder on another host whose heartbeat is older than this is taken for dead (10 missed heartbeats)."""


def job_id() -> Optional[str]:
    """The scheduler's id of this job (SLURM, with the array task; PBS; LSF), if any."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID") or env.get("PBS_JOBID") or env.get("LSB_JOBID")


def process_start(pid: int) -> Optional[int]:
    """When ``pid`` started (clock ticks since boot, from /proc), or None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start: Optional[int]) -> bool:
    """Whether process ``pid`` runs on this host and is the one that started at ``start`` (when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    now_start = process_start(pid)
    return start is None or now_start is None or now_start == start


@dataclass
class Holder:
    """What a lock file says about its holder."""

    host: str
    pid: int
    token: str
    since: float
    heartbeat: float
    job_id: Optional[str] = None
    restart: Optional[str] = None
    pid_start: Optional[int] = None
    what: str = ""

    def describe(self) -> str:
        if not self.host:  # not a lock file of this module (an older version's token)
            return f"holder {self.token}"
        since = datetime.fromtimestamp(self.since, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        job = f", job {self.job_id}" if self.job_id else ""
        return f"host {self.host}, PID {self.pid}{job}, since {since}, last heartbeat {time.time() - self.heartbeat:.0f} s ago"


def read_holder(path: Path) -> Optional[Holder]:
    """The lock's holder; None when the file is gone. A file that is not a lock of ours reads as a holder with
    only a token (its text): nothing says it is alive."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        values = json.loads(text)
        return Holder(**{k: values.get(k) for k in Holder.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError):
        return Holder(host="", pid=0, token=text.strip(), since=0.0, heartbeat=0.0)


def dead_because(holder: Holder, stale_s: float = STALE_S) -> Optional[str]:
    """Why ``holder`` is dead (None: alive, or cannot be told dead)."""
    if not holder.host:
        return "it records no holder"
    if holder.host == socket.gethostname():
        if not pid_alive(holder.pid, holder.pid_start):
            return f"PID {holder.pid} is gone from {holder.host}"
        return None
    restart = os.environ.get("SLURM_RESTART_COUNT")
    if holder.job_id and holder.job_id == job_id() and holder.restart != restart:
        return f"it was an earlier attempt of this SLURM job {holder.job_id} (requeued)"
    age = time.time() - (holder.heartbeat or 0.0)
    if age > stale_s:
        return f"its heartbeat is {age:.0f} s old (over {stale_s:.0f} s)"
    return None


class LockFile:
    """A lock file held by this process, with a heartbeat thread; released by :meth:`release` or at exit.

    Args:
        path: The lock file.
        what: What it guards, for messages (``output_dir /x``).
        token: Shared by the processes of one job (those must not refuse each other); default: unique.
    """

    def __init__(self, path: Path, what: str, token: Optional[str] = None, heartbeat_s: float = HEARTBEAT_S):
        self.path, self.what, self.heartbeat_s = Path(path), what, heartbeat_s
        self.token = token or uuid.uuid4().hex
        self.held = False
        self.took_over: Optional[str] = None
        """The line saying whose dead lock this one replaced (None: it was free)."""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self, since: Optional[float] = None) -> str:
        now = time.time()
        holder = Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            token=self.token,
            since=since or now,
            heartbeat=now,
            job_id=job_id(),
            restart=os.environ.get("SLURM_RESTART_COUNT"),
            pid_start=process_start(os.getpid()),
            what=self.what,
        )
        return json.dumps(asdict(holder))

    def try_create(self) -> bool:
        """Create the lock if nobody holds it (atomic: ``O_EXCL``)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self._record())
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # a full disk: no empty lock file left behind
            self.path.unlink(missing_ok=True)
            raise
        self._held()
        return True

    def take_over(self, holder: Holder, reason: str, quiet: bool = False) -> bool:
        """Replace a dead holder's lock with ours; False when another process took it over at the same time.

        Args:
            quiet: Keep the line saying so in ``took_over`` without logging it (logging is not set up yet).
        """
        self._write(self._record())
        time.sleep(0.05)  # two takers racing: the last rename wins, and each reads back who that was
        mine = (read_holder(self.path) or holder).token == self.token
        if mine:
            self.took_over = f"took over the lock {self.path} of {self.what} from a dead holder ({holder.describe()}; {reason})"
            if not quiet:
                log.warning("%s", self.took_over)
            self._held()
        return mine

    def _write(self, text: str) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{socket.gethostname()}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def _held(self) -> None:
        self.held = True
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = read_holder(self.path)
            if holder is None or holder.token != self.token:
                taker = holder.describe() if holder else "removed"
                log.error("the lock %s of %s was taken by another process (%s)", self.path, self.what, taker)
                return
            try:
                self._write(self._record(since=holder.since))
            except OSError as e:  # a full disk must not kill the heartbeat thread's owner; the next beat retries
                log.warning("could not refresh the heartbeat of %s: %s", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)
