"""The thin entry point: launcher arguments are stripped, multirun is refused with a pointer to the sweep script."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))
from train import strip_launcher_args  # noqa: E402


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--local_rank=1", "+exp=tiny_cpu"], ["+exp=tiny_cpu"]),
        (["+exp=tiny_cpu", "--local_rank", "3", "train.lr=1"], ["+exp=tiny_cpu", "train.lr=1"]),
        (["+exp=tiny_cpu"], ["+exp=tiny_cpu"]),
    ],
)
def test_strip_launcher_args(argv, expected):
    assert strip_launcher_args(argv) == expected


def test_multirun_is_refused_with_a_pointer_to_the_sweep_script():
    out = subprocess.run(
        [sys.executable, "launch/train.py", "-m", "+exp=tiny_cpu", "train.lr=1e-4,3e-4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "launch/sweep.py" in out.stderr


def test_bad_data_path_is_a_clear_error_not_a_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "launch/train.py", "+exp=tiny_cpu", f"output_dir={tmp_path}", f"data.path={tmp_path}/missing.jsonl"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "missing.jsonl: no such file" in out.stderr
    assert "Traceback" not in out.stderr
