"""One error contract: every user-facing error has its exit code, and every entry point maps them the same way."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrain import errors
from dtrain.errors import (
    EXIT_BAD_INPUT,
    EXIT_PREEMPTED,
    EXIT_TRAINING_STOPPED,
    ConfigError,
    DataError,
    ExportError,
    Preempted,
    TrainingError,
    exit_on_error,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "error, code",
    [
        (ConfigError("c"), EXIT_BAD_INPUT),
        (DataError("d"), EXIT_BAD_INPUT),
        (TrainingError("t"), EXIT_TRAINING_STOPPED),
        (ExportError("e"), EXIT_TRAINING_STOPPED),
    ],
)
def test_each_error_exits_with_its_code_and_one_line(capsys, error, code):
    with pytest.raises(SystemExit) as stop, exit_on_error():
        raise error
    assert stop.value.code == code
    assert capsys.readouterr().err == f"dtrain: error: {error}\n"


def test_preemption_says_requeue(capsys):
    with pytest.raises(SystemExit) as stop, exit_on_error():
        raise Preempted("stopped at step 4")
    assert stop.value.code == EXIT_PREEMPTED == 75
    assert capsys.readouterr().err == "dtrain: stopped at step 4; exit code 75 (requeue)\n"


def test_other_exceptions_keep_their_traceback():
    with pytest.raises(KeyError), exit_on_error():
        raise KeyError("a bug, not a user error")


def test_every_code_is_listed_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for code, meaning in errors.EXIT_CODES.items():
        assert f"| {code} |" in readme, (code, meaning)


def test_entry_points_report_bad_input_the_same_way(tmp_path):
    """Each launch/ script: one `dtrain: error:` line naming the problem, exit code 2, no traceback."""
    cases = [
        ([sys.executable, "launch/report.py"], "pass run_dir="),
        ([sys.executable, "launch/report.py", f"run_dir={tmp_path}"], "no metrics.jsonl"),
        ([sys.executable, "launch/export.py", f"run_dir={tmp_path}", "merge=true"], "config.yaml not found"),
        ([sys.executable, "launch/plan.py", "+exp=tiny_cpu", "plan.gpu=B200X"], "plan.gpu=B200X: unknown GPU"),
        ([sys.executable, "launch/preview.py", "+exp=tiny_cpu", f"data.path={tmp_path / 'missing.jsonl'}"], "no such file"),
        ([sys.executable, "launch/train.py", "-m", "+exp=tiny_cpu"], "python launch/sweep.py -m"),
    ]
    # Independent processes, mostly Python start-up: all at once, on every core.
    running = [
        (cmd, message, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for cmd, message in cases
    ]
    for cmd, message, process in running:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == EXIT_BAD_INPUT, (cmd, stderr[-2000:])
        assert "dtrain: error:" in stderr and message in stderr, (cmd, stderr[-2000:])
        assert "Traceback" not in stderr, (cmd, stderr[-2000:])


def test_an_error_every_rank_raises_is_printed_by_rank_0_only(capsys, monkeypatch):
    from dtrain.errors import EXIT_DISK_FULL, DiskFull

    for rank, printed in (("1", ""), ("0", "dtrain: error: full\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop, exit_on_error():
            raise DiskFull("full", every_rank=True)
        assert stop.value.code == EXIT_DISK_FULL and capsys.readouterr().err == printed
    monkeypatch.setenv("RANK", "1")  # an error of this rank alone is always printed
    with pytest.raises(SystemExit), exit_on_error():
        raise TrainingError("out of memory on rank 1")
    assert capsys.readouterr().err == "dtrain: error: out of memory on rank 1\n"


def test_a_training_rank_leaves_with_the_errors_code_after_flushing_and_without_the_teardown(tmp_path):
    """A rank's error exit skips the interpreter's teardown (where gloo's destructors can abort the rank, -6, and
    hide the code) but not what the rank wrote (block-buffered stdout, the log, the one error line) nor its exit
    handlers (the run directory's lock is released by one)."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import atexit, logging, sys\n"
        "import torch.distributed as td\n"
        "from dtrain.dist import exit_rank_on_error\n"
        "from dtrain.errors import DiskFull\n"
        f"td.init_process_group('gloo', init_method='file://{tmp_path / 'rendezvous'}', rank=0, world_size=1)\n"
        "class Group:  # stands for a process group whose destructor runs in the teardown\n"
        "    def __del__(self): print('interpreter teardown ran')\n"
        "group = Group()\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "logging.basicConfig(filename=sys.argv[1], level=logging.INFO)\n"
        "logging.getLogger('dtrain').info('a log line before the error')\n"
        "print('written before the error')\n"
        "with exit_rank_on_error():\n"
        "    raise DiskFull('no space left on device for a checkpoint')\n"
    )
    log_file = tmp_path / "rank.log"
    out = subprocess.run([sys.executable, str(script), str(log_file)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 28, out.stderr[-2000:]
    assert out.stdout == "written before the error\nexit handler ran\n"
    assert out.stderr.splitlines()[-1] == "dtrain: error: no space left on device for a checkpoint"
    assert "a log line before the error" in log_file.read_text()


def test_a_rank_that_lost_a_peer_says_so_at_once_and_leaves_after_the_grace(tmp_path):
    """DeepSpeed's launcher exits with the code of the first failed rank it polls (once a second). A rank whose
    collective failed because a peer died must not win that race with its 3: it prints its line at once, then waits
    ``PeerLost.grace_s`` (shortened here) before it exits, while the peer's own code (86: hung) is already there."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import atexit, time\n"
        "from dtrain.dist import exit_rank_on_error\n"
        "from dtrain.errors import PeerLost\n"
        "PeerLost.grace_s = 1.5\n"
        "atexit.register(lambda: print('exit handler ran', flush=True))\n"
        "with exit_rank_on_error():\n"
        "    raise PeerLost('rank 0: a collective failed in step 3 because another rank died')\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    said_at = time.monotonic()
    assert proc.wait(timeout=120) == EXIT_TRAINING_STOPPED
    assert time.monotonic() - said_at >= 1.4
    assert line == "dtrain: error: rank 0: a collective failed in step 3 because another rank died\n"
    assert proc.stdout.read() == "exit handler ran\n"
