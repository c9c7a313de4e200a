"""Packing: rows fit, nothing is lost, labels never cross boundaries, and a packed row computes exactly what its
examples compute one at a time (no attention across examples), for sdpa and eager attention."""

import random

import pytest
import torch

from dtrain.config.schema import TrainOn
from dtrain.data import IGNORE_INDEX, ChatRenderer
from dtrain.data.packing import choose_packing, collate_packed, pack_examples, padded_efficiency
from dtrain.loss import shifted_token_loss_sum


def test_rows_fit_cover_everything_once_and_are_deterministic():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = pack_examples(lengths, max_len=128, seed=3)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert rows == pack_examples(lengths, max_len=128, seed=3)
    assert sum(lengths) / (128 * len(rows)) > 0.95  # best-fit decreasing leaves little room on mixed lengths


def test_overlong_example_is_refused():
    with pytest.raises(ValueError, match="max_len=8"):
        pack_examples([3, 9], max_len=8, seed=0)


def examples(tokenizer, train_on=TrainOn.assistant):
    renderer = ChatRenderer(tokenizer, train_on)
    conversations = [
        [{"role": "user", "content": "upper: abc"}, {"role": "assistant", "content": "ABC"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "reverse: hello"},
            {"role": "assistant", "content": "olleh"},
        ],
        [
            {"role": "user", "content": "repeat: xy"},
            {"role": "assistant", "content": "xy xy"},
            {"role": "user", "content": "upper: q"},
            {"role": "assistant", "content": "Q"},
        ],
    ]
    return [renderer.render(c) for c in conversations]


@pytest.mark.parametrize("train_on", [TrainOn.assistant, TrainOn.all])
def test_labels_never_cross_a_boundary(tiny_tokenizer, train_on):
    row = examples(tiny_tokenizer, train_on)
    batch = collate_packed([row], pad_token_id=tiny_tokenizer.pad_token_id)
    starts = [0]
    for e in row[:-1]:
        starts.append(starts[-1] + len(e.input_ids))
    for s in starts:
        assert batch["labels"][0, s] == IGNORE_INDEX and batch["position_ids"][0, s] == 0
    # Same number of trained targets as the examples unpacked.
    assert int((batch["labels"][0, 1:] != IGNORE_INDEX).sum()) == sum(e.num_trained for e in row)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_one_at_a_time(tiny_tokenizer, tiny_pretrained, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pretrained, dtype=torch.float32, attn_implementation=attn).eval()
    row = examples(tiny_tokenizer)
    other_row = row[1:2]  # a second, shorter row: the batch also carries a padding block
    batch = collate_packed([row, other_row], pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        offset, loss_sum = 0, 0.0
        for e in row:
            ids = torch.tensor([e.input_ids])
            alone = model(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(packed[0, offset : offset + len(e.input_ids)], alone[0], rtol=1e-5, atol=1e-5)
            loss_sum += float(shifted_token_loss_sum(alone, torch.tensor([e.labels])))
            offset += len(e.input_ids)
        n = len(other_row[0].input_ids)
        torch.testing.assert_close(packed[1, :n], model(input_ids=torch.tensor([other_row[0].input_ids])).logits[0], rtol=1e-5, atol=1e-5)
    packed_loss = float(shifted_token_loss_sum(packed[:1], batch["labels"][:1]))
    assert packed_loss == pytest.approx(loss_sum, rel=1e-5)


def test_packing_the_bundled_data_fills_over_95_percent_of_the_slots(tiny_tokenizer):
    from dtrain.config import compose_job
    from dtrain.data import prepare_data

    job = compose_job(["+exp=tiny_cpu", "data.cache_dir=null"])
    data = prepare_data(job.data, ChatRenderer(tiny_tokenizer, job.data.train_on), 0, 0)
    lengths = [len(e.input_ids) for e in data.train]
    assert max(lengths) > 2 * min(lengths)  # mixed-length data
    rows = pack_examples(lengths, job.data.max_seq_len, seed=0)
    assert sum(lengths) / (job.data.max_seq_len * len(rows)) > 0.95
    # data.packing=null packs this data: padded micro-batches of 16 would be about half padding
    pack, efficiency = choose_packing(lengths, 16, seed=0)
    assert pack and 0.45 < efficiency < 0.65


def test_auto_packing_pads_uniform_data_and_single_example_batches():
    assert padded_efficiency([10, 30], 2, seed=0) == pytest.approx(40 / 60)
    assert choose_packing([100, 98, 101, 99] * 50, 8, seed=0)[0] is False  # near-uniform: padding costs ~2%
    assert choose_packing([10, 300] * 50, 1, seed=0)[0] is False  # one example per micro-batch: no padding at all
    assert choose_packing([10, 300] * 50, 4, seed=0)[0] is True
