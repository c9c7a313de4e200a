"""Checkpoint bookkeeping without DeepSpeed: completeness, choice on resume, keep_last, config checks, RNG state."""

import json
import random

import numpy as np
import pytest
import torch

from dtrain.checkpoint import (
    MANIFEST,
    POINTER,
    CheckpointManager,
    FoundCheckpoint,
    TrainerState,
    capture_rng,
    check_complete,
    find_resume_checkpoint,
    restore_rng,
    resume_key,
)
from dtrain.config import compose_job
from dtrain.config.schema import CheckpointConfig
from dtrain.dist import DistInfo
from dtrain.errors import ConfigError

ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def found(manager: CheckpointManager, step: int) -> FoundCheckpoint:
    path = manager.root / f"step_{step:08d}"
    return FoundCheckpoint(path, json.loads((path / "trainer_state.json").read_text()))


def fake_save(manager: CheckpointManager, step: int, commit: bool = True):
    """What a save leaves before the commit: a partial folder with files; then (optionally) rank 0's commit."""
    partial = manager.root / f"step_{step:08d}.partial"
    partial.mkdir(parents=True)
    (partial / "engine.pt").write_bytes(b"x" * (100 + step))
    (partial / "trainer_state.json").write_text(json.dumps({"step": step, "config_key": manager.key}))
    if commit:
        manager._commit(partial, manager.root / f"step_{step:08d}")
        manager._prune(keep=manager.root / f"step_{step:08d}")
    return partial


def manager(tmp_path, keep_last=2, resume="auto", force=False, key=None):
    cfg = CheckpointConfig(every_steps=1, keep_last=keep_last, resume=resume, force_resume=force)
    return CheckpointManager(tmp_path, cfg, ONE_PROCESS, key or {"data.path": "a.jsonl"}, exclude_frozen=False)


def test_keep_last_two_after_five_saves_and_pointer(tmp_path):
    m = manager(tmp_path, keep_last=2)
    for step in (4, 8, 12, 16, 20):
        fake_save(m, step)
    names = sorted(p.name for p in m.root.iterdir() if p.is_dir())
    assert names == ["step_00000016", "step_00000020"]
    assert (m.root / POINTER).read_text().strip() == "step_00000020"
    assert all(check_complete(m.root / n) is None for n in names)
    manifest = json.loads((m.root / "step_00000020" / MANIFEST).read_text())
    assert manifest["files"] == {"engine.pt": 120, "trainer_state.json": len((m.root / "step_00000020" / "trainer_state.json").read_text())}


def test_partial_save_is_ignored_and_newest_complete_chosen(tmp_path, caplog):
    m = manager(tmp_path, keep_last=0)
    fake_save(m, 4)
    fake_save(m, 8)
    fake_save(m, 12, commit=False)  # killed while being written: no manifest, still .partial
    with caplog.at_level("WARNING", logger="dtrain"):
        chosen = find_resume_checkpoint(m.root, "auto")
    assert chosen == m.root / "step_00000008"
    assert "step_00000012.partial" in caplog.text
    fake_save(m, 16)  # the next complete save removes the dead partial folder
    assert not (m.root / "step_00000012.partial").exists()


def test_damaged_checkpoint_skipped_by_auto_refused_by_required(tmp_path):
    m = manager(tmp_path, keep_last=0)
    fake_save(m, 4)
    fake_save(m, 8)
    (m.root / "step_00000008" / "engine.pt").write_bytes(b"truncated")
    assert find_resume_checkpoint(m.root, "auto") == m.root / "step_00000004"
    with pytest.raises(ConfigError, match=r"step_00000008/engine.pt has 9 bytes, the manifest says 108"):
        find_resume_checkpoint(m.root, "required")


def test_required_without_checkpoint_and_bad_path(tmp_path):
    assert find_resume_checkpoint(tmp_path / "checkpoints", "auto") is None
    assert find_resume_checkpoint(tmp_path / "checkpoints", "never") is None
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        find_resume_checkpoint(tmp_path / "checkpoints", "required")
    with pytest.raises(ConfigError, match="does not exist"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "nope"))
    m = manager(tmp_path)
    partial = fake_save(m, 3, commit=False)
    with pytest.raises(ConfigError, match="COMPLETE.json is missing"):
        find_resume_checkpoint(tmp_path, str(partial))


def test_changed_settings_refused_unless_forced(tmp_path):
    old = manager(tmp_path, key={"data.path": "a.jsonl", "train.micro_batch_size": "4"})
    fake_save(old, 10)
    new = manager(tmp_path, key={"data.path": "b.jsonl", "train.micro_batch_size": "4"})
    with pytest.raises(ConfigError, match=r"data.path: a.jsonl -> b.jsonl.*force_resume=true"):
        new.check(found(new, 10))
    forced = manager(tmp_path, force=True, key={"data.path": "b.jsonl", "train.micro_batch_size": "4"})
    forced.check(found(forced, 10))


def test_resume_key_covers_what_matters_only():
    base = resume_key(compose_job(["+exp=tiny_cpu"]), world_size=2)
    assert resume_key(compose_job(["+exp=tiny_cpu", "train.lr=1e-4", "train.max_steps=999", "train.eval_every=7"]), 2) == base
    for override in ("train.micro_batch_size=3", "data.max_seq_len=64", "peft=lora", "precision=fp32", "train.seed=1"):
        assert resume_key(compose_job(["+exp=tiny_cpu", override]), 2) != base, override
    # The layout may change (dtrain.reshard): ZeRO stage, offload, and the world size at the same global batch.
    assert resume_key(compose_job(["+exp=tiny_cpu", "zero=zero3_offload"]), 2) == base
    assert resume_key(compose_job(["+exp=tiny_cpu", "train.grad_accum_steps=2"]), world_size=1) == base
    assert resume_key(compose_job(["+exp=tiny_cpu"]), world_size=4) != base  # another global batch
    # A mixture's weights set which examples each step draws: another weight is another data position.
    mixture = ["+exp=tiny_cpu", "data.path=null", "data.sources=[{path: a.jsonl}, {path: b.jsonl, weight: 2}]"]
    reweighted = mixture[:-1] + ["data.sources=[{path: a.jsonl}, {path: b.jsonl, weight: 3}]"]
    assert resume_key(compose_job(mixture), 2) != resume_key(compose_job(reweighted), 2)
    # Field mapping and template arguments change what each record becomes; unset, they leave the key as it was
    # before they existed (a checkpoint written then still resumes).
    for override in ("data.role_key=from", "++data.roles={bot: assistant}", "++data.chat_template_kwargs={enable_thinking: false}"):
        assert resume_key(compose_job(["+exp=tiny_cpu", override]), 2) != base, override
    assert not any(name in base for name in ("data.role_key", "data.roles", "data.chat_template_kwargs"))
    assert "roles" not in base["data.sources"] and "roles" not in resume_key(compose_job(mixture), 2)["data.sources"]
    mapped = mixture[:-1] + ["data.sources=[{path: a.jsonl}, {path: b.jsonl, weight: 2, roles: {bot: assistant}}]"]
    assert resume_key(compose_job(mixture), 2) != resume_key(compose_job(mapped), 2)


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(capture_rng()))
    first = (random.random(), np.random.rand(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(3).tolist()) == first


def test_trainer_state_fields_survive_json():
    state = TrainerState(step=7, epoch=1, step_in_epoch=2, consumed_units=28, recent_losses=[1.5, 2.0])
    assert TrainerState(**json.loads(json.dumps(state.__dict__))) == state


def test_choose_picks_newest_or_refuses_changed_settings(tmp_path, caplog):
    fresh = manager(tmp_path)
    with caplog.at_level("INFO", logger="dtrain"):
        assert fresh.choose() is None
    assert "starting fresh" in caplog.text
    fake_save(fresh, 4)
    fake_save(fresh, 8)
    assert manager(tmp_path).choose() == tmp_path / "checkpoints" / "step_00000008"
    assert manager(tmp_path, resume="never").choose() is None
    with pytest.raises(ConfigError, match="data.path: a.jsonl -> other.jsonl"):
        manager(tmp_path, key={"data.path": "other.jsonl"}).choose()


def test_reshard_keeps_the_global_batch_or_lists_the_choices():
    from dtrain.reshard import accumulation_for

    assert accumulation_for(32, micro_batch=16, world_size=1) == 2
    assert accumulation_for(32, micro_batch=4, world_size=4) == 2
    with pytest.raises(ConfigError, match="micro_batch_size=1 grad_accum_steps=8, micro_batch_size=2 grad_accum_steps=4"):
        accumulation_for(32, micro_batch=3, world_size=4)
    with pytest.raises(ConfigError, match="cannot be split over 3 ranks"):
        accumulation_for(32, micro_batch=1, world_size=3)


def test_only_partitioning_changes_need_a_conversion():
    from dtrain.reshard import layout_changes, layout_of, needs_conversion

    saved = layout_of(compose_job(["+exp=tiny_cpu", "zero=zero2"]), 2)
    split = layout_changes(
        saved, layout_of(compose_job(["+exp=tiny_cpu", "zero=zero2", "train.micro_batch_size=8", "train.grad_accum_steps=2"]), 2)
    )
    assert split and not needs_conversion(split)  # same partitions: an ordinary load
    nodes = layout_changes(saved, layout_of(compose_job(["+exp=tiny_cpu", "zero=zero2"]), 2, nodes=2))
    assert nodes == {"nodes": (1, 2)} and not needs_conversion(nodes)  # said in the log, loaded as it is
    assert needs_conversion(layout_changes(saved, layout_of(compose_job(["+exp=tiny_cpu", "zero=zero3"]), 2)))
    assert needs_conversion(layout_changes(saved, layout_of(compose_job(["+exp=tiny_cpu", "train.grad_accum_steps=2"]), 1)))


def test_an_interrupted_conversion_is_never_taken_for_complete(tmp_path):
    from dtrain.reshard import UNIVERSAL_DIR, convert_to_universal, is_converted

    checkpoint = tmp_path / "step_00000007"
    (checkpoint / f"{UNIVERSAL_DIR}.partial123" / "zero").mkdir(parents=True)  # a conversion killed midway
    (checkpoint / UNIVERSAL_DIR / "zero").mkdir(parents=True)  # or a folder without its completion marker
    assert not is_converted(checkpoint)
    with pytest.raises(ConfigError, match="converting .* to a universal checkpoint failed"):
        convert_to_universal(checkpoint)  # not a DeepSpeed checkpoint: the converter fails
    assert not is_converted(checkpoint) and sorted(p.name for p in checkpoint.iterdir()) == []  # nothing left behind


def test_a_step_counter_shared_by_the_loaded_optimizer_states_is_untied():
    """DeepSpeed's ZeRO-3 universal load puts one ``step`` tensor into every partition's state; untied, the next
    update is the one of an optimizer whose states were restored one by one (each group's bias correction at step 8)."""
    from types import SimpleNamespace

    from dtrain.reshard import repair_optimizer_steps

    def loaded(shared_step: bool):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
        opt = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "weight_decay": 0.0}], lr=0.1)
        step = torch.tensor(7.0)
        for p in params:
            p.grad = torch.randn_like(p)
            opt.state[p] = {"step": step if shared_step else step.clone(), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
        return params, opt

    reference, ref_opt = loaded(shared_step=False)
    ref_opt.step()
    params, opt = loaded(shared_step=True)
    assert repair_optimizer_steps(SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt))) == (1, 0)
    opt.step()
    assert [float(s["step"]) for s in opt.state.values()] == [8.0, 8.0]
    assert all(torch.equal(p, r) for p, r in zip(params, reference))
    still_shared, shared_opt = loaded(shared_step=True)
    shared_opt.step()  # what DeepSpeed leaves: the second group updates with step 9's bias correction
    assert not torch.equal(still_shared[1], reference[1])


def test_cpu_adam_step_counts_become_tensors_for_torch_adamw():
    """A run saved with optimizer offload (DeepSpeed's CPU Adam counts in ints) resumed without it: torch's AdamW
    refuses an int step; repaired, it updates as if the state had been its own."""
    from types import SimpleNamespace

    from dtrain.reshard import repair_optimizer_steps

    def loaded(step):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(4))
        param.grad = torch.randn(4)
        opt = torch.optim.AdamW([param], lr=0.1)
        opt.state[param] = {"step": step, "exp_avg": torch.randn(4), "exp_avg_sq": torch.rand(4)}
        return param, opt

    reference, ref_opt = loaded(torch.tensor(7.0))
    ref_opt.step()
    param, opt = loaded(7)
    with pytest.raises(RuntimeError, match="singleton tensors"):
        opt.step()
    assert repair_optimizer_steps(SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt))) == (0, 1)
    opt.step()
    assert torch.equal(param, reference) and float(opt.state[param]["step"]) == 8.0


def test_a_layout_change_is_refused_under_reshard_never_and_a_global_batch_or_packing_change_always(tmp_path):
    """What elastic resume may not do, refused before any model loads (the launched resumes are in
    tests/integration/test_elastic_resume.py): another layout under ``ckpt.reshard=never``; another global batch or
    packing layout."""
    from dtrain.reshard import layout_of
    from dtrain.setup import checkpoint_manager, prepare_resume

    two_ranks = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), local_world_size=2)
    saved = compose_job(["+exp=tiny_cpu", "zero=zero3", f"output_dir={tmp_path}"])
    checkpoint = FoundCheckpoint(tmp_path / "step_00000007", {"step": 7, "config_key": resume_key(saved, 2), "layout": layout_of(saved, 2)})
    never = compose_job(["+exp=tiny_cpu", "zero=zero2", "ckpt.reshard=never", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"another layout \(zero.stage 3 -> 2\) and ckpt.reshard=never; set ckpt.reshard=auto"):
        prepare_resume(checkpoint, never, two_ranks)
    halved = compose_job(["+exp=tiny_cpu", "zero=zero3", "train.micro_batch_size=8", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="global_batch_size: 32 -> 16"):
        checkpoint_manager(tmp_path, halved, two_ranks, checkpoint)
    # A run whose data.packing=null resolved to packed rows resumes under data.packing=true (the launched case in
    # tests/integration/test_resolved_run.py), never under padded micro-batches.
    packed = compose_job(["+exp=tiny_cpu", "data.packing=true", f"output_dir={tmp_path}"])
    checkpoint = FoundCheckpoint(
        tmp_path / "step_00000002", {"step": 2, "config_key": resume_key(packed, 2), "layout": layout_of(packed, 2)}
    )
    padded = compose_job(["+exp=tiny_cpu", "data.packing=false", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.packing: True -> False"):
        checkpoint_manager(tmp_path, padded, two_ranks, checkpoint)
