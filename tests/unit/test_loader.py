"""The loader: the sampler's units collated, per-step counts, resume at any step, eval shards, the export probe."""

import random
import zlib
from contextlib import closing
from itertools import islice

import pytest
import torch
from safetensors.torch import save_file

from dtrain.config.batch import BatchPlan
from dtrain.config.schema import LengthGrouping
from dtrain.data import IGNORE_INDEX, TokenizedExample
from dtrain.data.loader import TrainLoader, collate_units, eval_batches, probe_batch, sequence_shard
from dtrain.errors import ConfigError

PAD = 0


def synthetic(n: int, seed: int = 0, longest: int = 40) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(4, longest)
        prompt = rng.randint(1, length - 2)
        ids = [rng.randint(1, 250) for _ in range(length)]
        out.append(TokenizedExample(f"data.jsonl:{i + 1}", ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


STEP_OF_8 = BatchPlan(2, 2, 2)


def loader(examples, batch=STEP_OF_8, rank=0, packing=False, grouping=LengthGrouping.within_step):
    return TrainLoader(examples, batch, rank, packing=packing, max_seq_len=64, seed=7, grouping=grouping, pad_token_id=PAD)


@pytest.mark.parametrize("packing", [False, True])
def test_step_counts_describe_the_collated_tensors(packing):
    examples = synthetic(100)
    with closing(loader(examples, packing=packing).step_batches(0)) as steps:
        for batch in islice(steps, 5):
            stats = batch.stats
            assert stats.trained_tokens == sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batch.micro_batches)
            # Packed or not, an example's first label is never a target: the same count as one at a time.
            assert stats.trained_tokens == sum(e.num_trained for e in batch.examples)
            assert stats.real_tokens == sum(len(e.input_ids) for e in batch.examples)
            assert stats.token_slots == sum(b["input_ids"].numel() for b in batch.micro_batches) >= stats.real_tokens
            assert stats.fingerprint == sum(zlib.crc32(e.source.encode()) for e in batch.examples)
            assert len(batch.micro_batches) == 2


def test_resuming_at_any_step_gives_the_same_batches_across_epochs():
    examples = synthetic(40)  # 5 steps per epoch at 8 examples per step
    straight = loader(examples)
    assert straight.steps_per_epoch == 5
    with closing(straight.step_batches(0)) as steps:
        reference = [([e.source for e in b.examples], b.epoch) for b in islice(steps, 12)]
    for start in (3, 5, 7):
        with closing(loader(examples).step_batches(start)) as steps:
            assert [([e.source for e in b.examples], b.epoch) for b in islice(steps, 12 - start)] == reference[start:]
    assert [epoch for _, epoch in reference] == [0] * 5 + [1] * 5 + [2] * 2


def test_ranks_split_each_step_without_overlap():
    examples = synthetic(64)
    per_rank = []
    for rank in (0, 1):
        with closing(loader(examples, rank=rank).step_batches(0)) as steps:
            per_rank.append([{e.source for e in b.examples} for b in islice(steps, 4)])
    for a, b in zip(*per_rank):
        assert len(a) == len(b) == 4 and not a & b


def test_planned_padding_efficiency_is_what_the_batches_hold():
    examples = synthetic(96, longest=60)
    plan = BatchPlan(3, 2, 2)
    planned = loader(examples, batch=plan, grouping=LengthGrouping.none).planned_padding_efficiency()
    real = slots = 0
    for rank in (0, 1):
        rank_loader = loader(examples, batch=plan, rank=rank, grouping=LengthGrouping.none)
        with closing(rank_loader.step_batches(0)) as steps:
            for batch in islice(steps, rank_loader.steps_per_epoch):
                real += batch.stats.real_tokens
                slots += batch.stats.token_slots
    assert planned == pytest.approx(real / slots, rel=1e-12)


def test_too_little_data_for_one_step_is_a_config_error():
    with pytest.raises(ConfigError, match="do not fill one global batch of 8"):
        loader(synthetic(7))


def test_eval_shards_run_the_same_number_of_batches_and_count_every_token_once():
    examples = synthetic(11)
    shards = [list(eval_batches(examples, rank, 2, 4, PAD)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2  # rank 1 has 5 examples: 2 batches, like rank 0's 6
    assert sum(n for shard in shards for _, n in shard) == sum(e.num_trained for e in examples)


def test_probe_batch_of_long_examples_is_cut_and_can_be_saved(tmp_path):
    long = synthetic(2, longest=900)
    long = [TokenizedExample(e.source, e.input_ids * 20, e.labels * 20) for e in long]  # well over 256 tokens
    batch = probe_batch(long, PAD, max_tokens=256)
    assert batch["input_ids"].shape == (2, 256) and all(t.is_contiguous() for t in batch.values())
    assert torch.equal(batch["input_ids"][0], torch.tensor(long[0].input_ids[:256]))
    save_file({k: v for k, v in batch.items()}, str(tmp_path / "probe.safetensors"))  # refused before the fix


# ------------------------------------------------------------------ sequence parallelism (parallel.sp_size)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("sp_size", [2, 3])
def test_sequence_pieces_put_back_together_are_the_padded_row_with_its_targets(packing, sp_size):
    units = [[e] for e in synthetic(4, seed=3)] if not packing else [synthetic(3, seed=3), synthetic(2, seed=4)]
    whole = collate_units(units, packing, PAD)
    pieces = [sequence_shard(whole, r, sp_size, PAD) for r in range(sp_size)]
    rows, width = whole["input_ids"].shape
    padded = -(-width // sp_size) * sp_size
    assert {p["input_ids"].shape for p in pieces} == {(rows, padded // sp_size)}
    assert all(set(p) == {"input_ids", "position_ids", "targets"} and all(t.is_contiguous() for t in p.values()) for p in pieces)
    joined = {k: torch.cat([p[k] for p in pieces], dim=1) for k in pieces[0]}
    assert torch.equal(joined["input_ids"][:, :width], whole["input_ids"]) and (joined["input_ids"][:, width:] == PAD).all()
    # Shifted before the cut: every target survives, the added padding trains nothing.
    assert torch.equal(joined["targets"][:, :width], whole["targets"]) and (joined["targets"][:, width:] == IGNORE_INDEX).all()
    positions = whole["position_ids"] if packing else torch.arange(width).expand(rows, width)
    assert torch.equal(joined["position_ids"][:, :width], positions)
    assert torch.equal(joined["position_ids"][:, width:], positions[:, -1:] + 1 + torch.arange(padded - width))


def test_a_label_at_a_cut_stays_with_the_token_that_predicts_it():
    example = TokenizedExample("x", [11, 12, 13, 14], [IGNORE_INDEX, IGNORE_INDEX, 13, 14])
    first, second = (sequence_shard(collate_units([[example]], False, PAD), r, 2, PAD) for r in (0, 1))
    assert first["targets"].tolist() == [[IGNORE_INDEX, 13]]  # token 12 predicts 13, across the cut
    assert second["targets"].tolist() == [[14, IGNORE_INDEX]]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_a_sequence_parallel_group_trains_one_data_parallel_rank_s_examples_and_counts_them_once(packing):
    examples = synthetic(64, seed=5)
    sp_plan = BatchPlan(2, 2, 2, sp_size=2)  # 4 ranks: groups (0, 1) and (2, 3)
    plain = [loader(examples, packing=packing, rank=r) for r in (0, 1)]
    groups = [loader(examples, batch=sp_plan, packing=packing, rank=r) for r in range(4)]
    with closing(plain[0].step_batches(0)) as a, closing(plain[1].step_batches(0)) as b:
        reference = [list(islice(a, 3)), list(islice(b, 3))]
    iterators = [g.step_batches(0) for g in groups]
    try:
        steps = [list(islice(it, 3)) for it in iterators]
    finally:
        for it in iterators:
            it.close()
    for step in range(3):
        for dp_rank in (0, 1):
            ref = reference[dp_rank][step]
            group = [steps[2 * dp_rank + sp_rank][step] for sp_rank in (0, 1)]
            assert [e.source for e in group[0].examples] == [e.source for e in group[1].examples] == [e.source for e in ref.examples]
            # Trained tokens summed over the pieces, example counts from the group's first rank only.
            assert group[0].stats.trained_tokens + group[1].stats.trained_tokens == ref.stats.trained_tokens
            assert (group[0].stats.real_tokens, group[0].stats.fingerprint) == (ref.stats.real_tokens, ref.stats.fingerprint)
            assert (group[1].stats.real_tokens, group[1].stats.fingerprint, group[1].stats.sum_sq_lengths) == (0, 0, 0)
            for k, micro in enumerate(ref.micro_batches):
                joined = torch.cat([group[0].micro_batches[k]["targets"], group[1].micro_batches[k]["targets"]], dim=1)
                assert torch.equal(joined[:, : micro["targets"].size(1)], micro["targets"])
