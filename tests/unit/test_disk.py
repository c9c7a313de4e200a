"""A full disk, in one process: each writer stops with one DiskFull naming path, free and needed bytes, and leaves
nothing that looks complete (checkpoint, export, token store, metrics, report); the start-up estimate warns."""

import errno
import json
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dtrain import disk, faults
from dtrain.checkpoint import POINTER, CheckpointManager, TrainerState
from dtrain.config import compose_job
from dtrain.config.schema import CheckpointConfig, WandbConfig, WandbMode
from dtrain.data import ChatRenderer
from dtrain.dist import DistInfo
from dtrain.errors import EXIT_DISK_FULL, DiskFull, TrainingError, exit_on_error
from dtrain.export import save_model
from dtrain.metrics import MetricsLogger, _drop_records_after, read_metrics

from tests.conftest import TINY_DIR
from tests.unit.test_checkpoint import fake_save
from tests.unit.test_metrics import step_record

ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture
def inject(monkeypatch):
    """Set ``DTRAIN_FAULT_ENOSPC`` for this test (the hook reads it once per process, so the cache is cleared)."""

    def set_fault(spec: str) -> None:
        monkeypatch.setenv("DTRAIN_FAULT_ENOSPC", spec)
        faults._target.cache_clear()

    yield set_fault
    faults._target.cache_clear()


class FakeEngine:
    """Writes one engine file the way DeepSpeed does (through its checkpoint engine), or fails like a full disk."""

    def __init__(self, error=None):
        self.error = error
        self.checkpoint_engine = self
        self.calls = 0

    def save(self, state_dict, path):
        torch.save(state_dict, path)

    def save_checkpoint(self, root, tag, **kwargs):
        self.calls += 1
        folder = disk.Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.error is not None:
            (folder / "model_states.pt").write_bytes(b"half")
            raise self.error
        self.checkpoint_engine.save({"w": torch.ones(1000)}, str(folder / "model_states.pt"))


class FakeTokenizer:
    def save_pretrained(self, path):
        disk.Path(path).mkdir(parents=True, exist_ok=True)
        (disk.Path(path) / "tokenizer.json").write_text("{}")


def manager(tmp_path) -> CheckpointManager:
    return CheckpointManager(tmp_path, CheckpointConfig(every_steps=4, keep_last=2), ONE_PROCESS, {"k": "v"}, exclude_frozen=False)


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    m = manager(tmp_path)
    first = m.save(FakeEngine(), FakeTokenizer(), TrainerState(step=4))
    assert m.expected_bytes == sum(f.stat().st_size for f in first.rglob("*") if f.is_file() and f.name != "COMPLETE.json")
    monkeypatch.setattr("dtrain.checkpoint.free_bytes", lambda path: m.expected_bytes - 1)
    engine = FakeEngine()
    with pytest.raises(DiskFull) as stop:
        m.save(engine, FakeTokenizer(), TrainerState(step=8))
    message = str(stop.value)
    assert engine.calls == 0 and not (m.root / "step_00000008.partial").exists()
    assert f"{m.root / 'step_00000008.partial'}: {disk.format_bytes(m.expected_bytes - 1)} free" in message
    assert f"the write needs {disk.format_bytes(m.expected_bytes)}" in message
    assert (m.root / POINTER).read_text().strip() == "step_00000004"


def test_a_save_that_fills_the_disk_leaves_the_last_checkpoint_named(tmp_path, monkeypatch, inject):
    m = manager(tmp_path)
    m.save(FakeEngine(), FakeTokenizer(), TrainerState(step=4))
    inject("checkpoint:8:0")  # the engine's first file of step 8 is cut in half, then ENOSPC
    with pytest.raises(DiskFull, match=r"no space left on device for checkpoint step 8 \(rank 0\): .*model_states.pt: .* free"):
        m.save(FakeEngine(), FakeTokenizer(), TrainerState(step=8))
    assert sorted(p.name for p in m.root.iterdir()) == [POINTER, "step_00000004"]  # the .partial folder is gone
    assert (m.root / POINTER).read_text().strip() == "step_00000004"

    # PyTorch's writer loses the errno ("unexpected pos"): a full disk only when the space is short as well.
    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4180")
    with pytest.raises(TrainingError, match="writing checkpoint step 12 failed on rank 0"):
        m.save(FakeEngine(torn), FakeTokenizer(), TrainerState(step=12))
    monkeypatch.setattr("dtrain.checkpoint.free_bytes", lambda path: 10)
    monkeypatch.setattr(m, "_space_problem", lambda partial, step: None)  # the disk filled after the check
    with pytest.raises(DiskFull, match="10 bytes free"):
        m.save(FakeEngine(torn), FakeTokenizer(), TrainerState(step=12))
    assert (m.root / POINTER).read_text().strip() == "step_00000004"


def test_an_unwrapped_write_on_a_full_disk_still_exits_28_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop, exit_on_error():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "memory.json"))
    err = capsys.readouterr().err
    assert stop.value.code == EXIT_DISK_FULL == 28
    assert err.startswith(f"dtrain: error: no space left on device for a write: {tmp_path / 'memory.json'}: ") and err.count("\n") == 1


def test_an_export_that_fills_the_disk_leaves_no_final_folder(tmp_path, inject, tiny_tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_DIR))
    final = tmp_path / "final"
    save_model(model, tiny_tokenizer, final, ONE_PROCESS, is_peft=False, max_shard_bytes=400_000)
    before = {p.name: p.stat().st_size for p in final.iterdir()}
    inject("export:2")  # the second shard is cut in half, then ENOSPC
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    expected = rf"for the exported model: .*shard-00001.tmp: .* free on its filesystem, the write needs .*{needed:,}"
    with pytest.raises(DiskFull, match=expected):
        save_model(model, tiny_tokenizer, final, ONE_PROCESS, is_peft=False, max_shard_bytes=400_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no final.partial, the earlier export untouched
    assert {p.name: p.stat().st_size for p in final.iterdir()} == before


def test_a_store_that_fills_the_disk_is_not_published(tmp_path, inject, tiny_tokenizer, monkeypatch):
    import itertools

    import dtrain.data.store
    from dtrain.data.cache import write_store

    job = compose_job(["+exp=tiny_cpu", f"data.prepared_path={tmp_path / 'store'}"])
    monkeypatch.setattr(dtrain.data.store, "_APPENDS", itertools.count(1))  # other tests of this process appended too
    inject("store:1")
    with pytest.raises(DiskFull, match=rf"for the token store: {tmp_path / 'store'}.tmp\d+/train.ids: .* free"):
        write_store(job.data, ChatRenderer(tiny_tokenizer, job.data.train_on), 0, 4, tmp_path / "store")
    assert list(tmp_path.iterdir()) == []


def test_metrics_on_a_full_disk_stop_the_run_and_the_torn_line_is_dropped_on_resume(tmp_path, inject):
    inject("metrics:3")
    logger = MetricsLogger(tmp_path, True, WandbConfig(mode=WandbMode.disabled), {}, "run")
    for step in (1, 2, 3, 4):
        logger.log(step_record(step, 1.0))
    logger.close()
    assert logger.failure.startswith(f"no space left on device for metrics.jsonl: {tmp_path / 'metrics.jsonl'}: ")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["step"] == 2  # the third record is half a line; the fourth never came
    assert [r.step for r in read_metrics(tmp_path).steps] == [1, 2]
    _drop_records_after(tmp_path / "metrics.jsonl", 2)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_report_that_does_not_fit_leaves_no_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from dtrain.report import render_report

    def full(self, path, **kwargs):
        disk.Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Figure, "savefig", full)
    expected = f"for the run report: {tmp_path / 'report.tmp.png'}: .* free on its filesystem, the write needs more"
    with pytest.raises(DiskFull, match=expected):
        render_report([tmp_path], tmp_path / "report.png")
    assert list(tmp_path.iterdir()) == []


def test_the_start_up_estimate_counts_kept_checkpoints_and_warns_when_short(tmp_path, monkeypatch, caplog):
    assert disk.checkpoints_at_once(every_steps=4, keep_last=2, total_steps=20) == 3
    assert disk.checkpoints_at_once(every_steps=4, keep_last=0, total_steps=22) == 6  # 5 periodic + the final one
    assert disk.checkpoints_at_once(every_steps=0, keep_last=2, total_steps=20) == 1
    fake_save(manager(tmp_path), 4)  # a checkpoint already there: its bytes are written
    existing = disk.directory_bytes(tmp_path / "checkpoints")
    assert existing > 104
    monkeypatch.setattr(disk, "free_bytes", lambda path: 2_000)
    with caplog.at_level(logging.INFO, logger="dtrain"):
        assert disk.report_disk_needs(tmp_path, 500, 3, 600)
        assert not disk.report_disk_needs(tmp_path, 1_000, 3, 600)
    fits, short = [r for r in caplog.records if r.message.startswith("disk:")]
    assert fits.levelno == logging.INFO and f"({3 * 500 + 600 - existing:,} bytes) more" in fits.message
    assert short.levelno == logging.WARNING and "NOT enough" in short.message and "exit code 28" in short.message


def test_the_planner_estimate_is_the_module_and_adam_states():
    from dtrain.memory.plan import ModelShape

    shape = ModelShape(num_parameters=1000, hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, head_dim=4, vocab=32)
    full = compose_job(["+exp=tiny_cpu", "precision=fp32", "zero=zero2"])
    assert disk.checkpoint_bytes_estimate(full, shape) == 1000 * (4 + 12)
    assert disk.export_bytes_estimate(full, shape) == 4000
    assert disk.checkpoint_bytes_estimate(compose_job(["+exp=tiny_cpu", "precision=fp32", "zero=zero3"]), shape) == 1000 * 12
    lora = compose_job(["+exp=tiny_cpu", "precision=bf16", "peft=lora", "zero=zero2"])
    trained = shape.lora_parameters(lora.peft.r)
    assert disk.checkpoint_bytes_estimate(lora, shape) == trained * (2 + 12) and disk.export_bytes_estimate(lora, shape) == trained * 2
