"""bench/startup.py: the two ways alternate, launch by launch, and the table compares their medians."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import startup  # noqa: E402

from common import RunFigures  # noqa: E402


def test_launches_alternate_between_the_real_modules_and_the_stand_ins(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_launch(name, overrides, run_dir, num_gpus, extra_env=None, **kwargs):
        calls.append((name, dict(extra_env or {})))
        real = (extra_env or {}).get("DTRAIN_REAL_DEEPSPEED_MUON") == "1"
        return RunFigures(name=name, exit_code=0, wall_s=(15.0 if real else 14.0) + len(calls) / 100)

    monkeypatch.setattr(startup, "launch", fake_launch)
    monkeypatch.setattr(sys, "argv", ["startup.py", "--repeats", "2", "--json", str(tmp_path / "startup.json")])
    startup.main()
    assert [env for _, env in calls] == [{"DTRAIN_REAL_DEEPSPEED_MUON": "1"}, {}] * 2
    rows = json.loads((tmp_path / "startup.json").read_text())["runs"]
    assert [r["median_wall_s"] for r in rows] == pytest.approx([15.02, 14.03])
    assert rows[1]["vs_real"] == pytest.approx(14.03 / 15.02)
    assert "stand-ins (default)" in capsys.readouterr().out
