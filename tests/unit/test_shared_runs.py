"""The reference runs of the integration tests are launched once per session, also when two xdist workers ask at once."""

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.integration.conftest import shared_run


def worker_factory(session_dir: Path, worker: str) -> SimpleNamespace:
    """A stand-in for one xdist worker's ``tmp_path_factory``: its base temp folder lies in the session's."""
    return SimpleNamespace(getbasetemp=lambda: session_dir / f"popen-{worker}")


def test_two_workers_asking_at_once_share_one_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    launches: list[Path] = []

    def launch(run_dir: Path) -> None:
        launches.append(run_dir)
        time.sleep(0.3)  # the other worker asks while this one is still launching
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("{}\n")

    results: dict[str, Path] = {}

    def ask(worker: str) -> None:
        results[worker] = shared_run(worker_factory(tmp_path, worker), "ref", launch)

    workers = [threading.Thread(target=ask, args=(w,)) for w in ("gw0", "gw1")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert len(launches) == 1
    assert results["gw0"] == results["gw1"] == tmp_path / "shared_runs" / "ref"
    assert (results["gw1"] / "metrics.jsonl").read_text() == "{}\n"


def test_a_failed_launch_is_launched_again_by_the_next_caller(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    calls: list[str] = []

    def failing(run_dir: Path) -> None:
        calls.append("failing")
        (run_dir / "checkpoints").mkdir(parents=True)  # what a run that died after a save leaves
        raise AssertionError("rank 0 exited with 1")

    def second(run_dir: Path) -> None:
        calls.append("second")
        assert not run_dir.exists()  # launched afresh, not resumed from the failed launch's checkpoint

    with pytest.raises(AssertionError, match="rank 0 exited"):
        shared_run(worker_factory(tmp_path, "gw0"), "ref", failing)
    run_dir = shared_run(worker_factory(tmp_path, "gw1"), "ref", second)
    assert calls == ["failing", "second"]
    assert shared_run(worker_factory(tmp_path, "gw0"), "ref", lambda d: calls.append("third")) == run_dir
    assert calls == ["failing", "second"]


def test_without_xdist_the_run_lies_in_this_sessions_temp_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    factory = SimpleNamespace(getbasetemp=lambda: tmp_path)
    assert shared_run(factory, "ref", lambda d: None) == tmp_path / "shared_runs" / "ref"
