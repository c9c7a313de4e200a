"""A full disk while the token store is written, and a store damaged after it was written, on 2 CPU ranks through
the deepspeed launcher: one ``dtrain: error:`` line naming the cause, nothing published half-written.

The disk fills through ``DTRAIN_FAULT_ENOSPC`` (``dtrain/faults.py``): the write fails with ENOSPC after half its
bytes, as on a full filesystem. The other faults around a run (a full disk in a checkpoint save and the export, a
second job in the run directory, a killed job's lock) are met by the recovery chain in
``tests/integration/test_recovery.py``, which also resumes exactly through them.
"""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, launch_train

pytestmark = pytest.mark.integration


def errors(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines() if "dtrain: error:" in line]


def test_token_store_full_disk_flipped_byte_and_cut_short(tmp_path, tiny_pretrained):
    short = ["+exp=tiny_cpu", f"model.path={tiny_pretrained}", "model.init=pretrained", "precision=fp32", "train.max_steps=2"]

    # The disk fills while the token store is written: exit 28, no store published (only its error note).
    cache = tmp_path / "cache"
    out = launch_train([*short, f"data.cache_dir={cache}"], tmp_path / "run", env={"DTRAIN_FAULT_ENOSPC": "store:1"})
    assert out.returncode == 28, out.stdout[-3000:] + out.stderr[-3000:]
    (line,) = errors(out)
    assert "no space left on device for the token store: " in line and "/train.ids: " in line
    assert [p for p in cache.iterdir() if p.is_dir()] == [] and not (tmp_path / "run" / "metrics.jsonl").exists()

    # Prepared ahead (in this process: what launch/prepare.py runs); a flipped byte keeps the size, so only
    # launch/prepare.py --verify finds it.
    from dtrain.config import compose_job
    from dtrain.data.prepare import prepare_job_store

    store = tmp_path / "store"
    prepare = [sys.executable, "launch/prepare.py", "+exp=tiny_cpu", f"data.prepared_path={store}"]
    prepare_job_store(compose_job(prepare[2:] + [f"output_dir={tmp_path / 'unused'}"]), progress=False)
    ids = store / "train.ids"
    original = ids.read_bytes()
    ids.write_bytes(original[:1000] + bytes([original[1000] ^ 0x10]) + original[1001:])
    out = subprocess.run([*prepare, "--verify"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = errors(out)
    assert f"the token store {store} is damaged: {ids} has CRC-32 " in line and "Traceback" not in out.stderr

    # Cut short by 100 bytes: training refuses it on every rank before any step, naming the file and both sizes.
    ids.write_bytes(original[:-100])
    out = launch_train([*short, f"data.prepared_path={store}"], tmp_path / "run2")
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    (line,) = errors(out)
    assert f"{ids} has {len(original) - 100} bytes, meta.json says {len(original)}" in line
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()
