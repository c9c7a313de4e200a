"""One writer per run directory: a live holder refuses a second job, a dead one is taken over, a heartbeat runs."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dtrain.errors import RunDirBusy
from dtrain.locks import LockFile, read_holder
from dtrain.runlock import LOCK_NAME, acquire_run_lock, run_dir_busy


def write_lock(run_dir, **fields):
    holder = {"host": socket.gethostname(), "pid": 1, "token": "other", "since": time.time() - 60, "heartbeat": time.time()}
    (run_dir / LOCK_NAME).write_text(json.dumps({**holder, **fields}))


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_a_second_job_is_refused_naming_the_holder_until_the_first_releases(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = acquire_run_lock(tmp_path)
    holder = read_holder(tmp_path / LOCK_NAME)
    assert holder.pid == os.getpid() and holder.host == socket.gethostname() and holder.job_id == "4242"
    with pytest.raises(RunDirBusy) as refused:
        acquire_run_lock(tmp_path)
    message = str(refused.value)
    assert f"output_dir {tmp_path} is in use by another job" in message
    assert f"host {socket.gethostname()}, PID {os.getpid()}, job 4242, since 20" in message
    assert run_dir_busy(tmp_path) == message
    first.release()
    assert not (tmp_path / LOCK_NAME).exists() and run_dir_busy(tmp_path) is None
    acquire_run_lock(tmp_path).release()


def test_a_dead_holders_lock_is_taken_over_saying_so(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)  # same host, its PID gone: a SIGKILLed job
    assert run_dir_busy(tmp_path) is None
    lock = acquire_run_lock(tmp_path)
    assert lock.took_over.startswith(f"took over the lock {tmp_path / LOCK_NAME} of output_dir {tmp_path} from a dead holder")
    assert f"PID {pid} is gone" in lock.took_over
    assert read_holder(tmp_path / LOCK_NAME).token == lock.token
    lock.release()


def test_another_hosts_holder_is_dead_only_once_its_heartbeat_is_stale(tmp_path):
    write_lock(tmp_path, host="node-b", pid=123, job_id="77", heartbeat=time.time() - 30)
    with pytest.raises(RunDirBusy, match=r"host node-b, PID 123, job 77, since .*last heartbeat 30 s ago"):
        acquire_run_lock(tmp_path)
    write_lock(tmp_path, host="node-b", pid=123, heartbeat=time.time() - 3600)
    lock = acquire_run_lock(tmp_path)
    lock.release()
    assert "heartbeat is 3600 s old" in lock.took_over


def test_a_requeued_slurm_job_takes_over_its_earlier_attempts_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(tmp_path, host="node-b", pid=5, job_id="9", restart="0")  # fresh heartbeat, but the job was requeued
    lock = acquire_run_lock(tmp_path)
    lock.release()
    assert "earlier attempt of this SLURM job 9" in lock.took_over


def test_the_holder_keeps_a_heartbeat_and_releases_only_its_own_lock(tmp_path):
    lock = LockFile(tmp_path / "x.lock", "test", heartbeat_s=0.05)
    assert lock.try_create()
    first = read_holder(lock.path).heartbeat
    time.sleep(0.3)
    assert read_holder(lock.path).heartbeat > first
    write_lock(tmp_path, token="someone-else")  # not ours: release leaves it alone
    (tmp_path / LOCK_NAME).replace(lock.path)
    lock.release()
    assert read_holder(lock.path).token == "someone-else"
