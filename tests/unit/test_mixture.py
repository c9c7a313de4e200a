"""Mixtures: sources and their checks, weighted epochs, per-source store indices, losses and metrics."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from dtrain.chunked_loss import chunked_token_loss_sum
from dtrain.config import compose_job
from dtrain.config.batch import BatchPlan
from dtrain.config.checks import check_data_sources
from dtrain.config.schema import DataConfig, LengthGrouping, SourceConfig
from dtrain.data import IGNORE_INDEX, ChatRenderer, DataError, data_sources, mixture_weights, prepare_data
from dtrain.data.loader import SourceLosses, TrainLoader, eval_batches
from dtrain.data.mixture import epoch_examples
from dtrain.errors import ConfigError
from dtrain.loss import group_loss_sums, shift_labels, token_loss_sum
from dtrain.metrics import EvalRecord, StepRecord, record_from_dict, record_to_dict


def chats(path, n, answer_words=1, tag="a"):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{tag} question {i}"},
                {"role": "assistant", "content": " ".join(["word"] * answer_words)},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_single_path_is_a_mixture_of_one():
    (source,) = data_sources(DataConfig(path="/data/sft/tulu.jsonl"))
    assert (source.name, source.weight, source.index) == ("tulu", 1.0, 0)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (DataConfig(), "set exactly one of data.path"),
        (DataConfig(path="a.jsonl", sources=[SourceConfig(path="b.jsonl")]), "set exactly one of data.path"),
        (DataConfig(sources=[SourceConfig(path="a.jsonl", weight=-1)]), r"data.sources\[0\] \(a.jsonl\): weight=-1 is negative"),
        (DataConfig(sources=[SourceConfig(path="a.jsonl", weight=0)]), "every weight is 0"),
        (DataConfig(sources=[SourceConfig(path="x/a.jsonl"), SourceConfig(path="y/a.jsonl")]), r"\['a'\] are used twice"),
        (DataConfig(sources=[SourceConfig(path="a.jsonl", max_examples=0)]), "max_examples=0 must be positive"),
    ],
)
def test_a_malformed_mixture_is_refused_naming_the_source(cfg, message):
    with pytest.raises(ConfigError, match=message):
        data_sources(cfg)


def test_a_missing_source_fails_before_any_tokenizer_or_model_with_its_name(tmp_path):
    good = chats(tmp_path / "good.jsonl", 4)
    cfg = DataConfig(sources=[SourceConfig(path=good), SourceConfig(path=str(tmp_path / "gone.jsonl"), name="code")])
    with pytest.raises(DataError, match=r"data.sources\[1\] \(code\): .*gone.jsonl: no such file"):
        check_data_sources(cfg)


def test_a_malformed_source_record_is_named_by_file_and_line(tmp_path, tiny_tokenizer):
    good = chats(tmp_path / "good.jsonl", 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": oops\n')
    cfg = DataConfig(sources=[SourceConfig(path=good), SourceConfig(path=str(bad))], eval_fraction=0, num_proc=1)
    with pytest.raises(DataError, match=f"{bad}:2: malformed JSON"):
        prepare_data(cfg, ChatRenderer(tiny_tokenizer, "assistant"), 0, 0)


def test_weights_set_how_often_each_example_is_drawn_per_epoch():
    source = np.array([0] * 100 + [1] * 300 + [2] * 50, np.int16)
    assert np.array_equal(epoch_examples(source, [1.0, 1.0, 1.0], seed=0), np.arange(450))
    drawn = epoch_examples(source, [2.0, 0.5, 0.0], seed=0)
    counts = Counter(drawn.tolist())
    assert all(counts[i] == 2 for i in range(100))  # weight 2: every example twice
    assert sum(1 for i in range(100, 400) if counts[i] == 1) == 150 and all(counts[i] <= 1 for i in range(100, 400))
    assert not any(counts[i] for i in range(400, 450))  # weight 0: only evaluated
    assert np.array_equal(drawn, epoch_examples(source, [2.0, 0.5, 0.0], seed=0))  # deterministic from the seed
    assert not np.array_equal(drawn, epoch_examples(source, [2.0, 0.5, 0.0], seed=1))
    # 1.5: every example once, and a seeded half of them once more.
    one_and_a_half = Counter(epoch_examples(source, [1.5, 1.0, 1.0], seed=3).tolist())
    assert sorted(Counter(one_and_a_half[i] for i in range(100)).items()) == [(1, 50), (2, 50)]


def mixture(tmp_path, tiny_tokenizer, weights, **data):
    paths = [chats(tmp_path / "short.jsonl", 120, 1, "s"), chats(tmp_path / "long.jsonl", 60, 6, "l")]
    cfg = DataConfig(
        sources=[SourceConfig(path=p, weight=w) for p, w in zip(paths, weights)], eval_fraction=0.1, num_proc=1, cache_dir="", **data
    )
    return cfg, prepare_data(cfg, ChatRenderer(tiny_tokenizer, "assistant"), 0, 2)


def test_drawn_proportions_match_the_weights_over_an_epoch(tmp_path, tiny_tokenizer):
    cfg, data = mixture(tmp_path, tiny_tokenizer, [1.0, 2.0])
    assert data.source_names == ["short", "long"]
    prepared = np.bincount(data.train.source_index, minlength=2)
    assert prepared.tolist() == [108, 54]  # 10% of each source held out for eval
    assert np.bincount(data.eval.source_index, minlength=2).tolist() == [12, 6]
    loader = TrainLoader(
        data.train,
        BatchPlan(2, 1, 1),
        0,
        packing=False,
        max_seq_len=2048,
        seed=0,
        grouping=LengthGrouping.none,
        pad_token_id=0,
        weights=mixture_weights(cfg, data.source_names),
    )
    drawn = Counter()
    for step in loader.sampler.steps(0):
        for micro in step:
            for u in micro:
                drawn.update(int(data.train.source_index[i]) for i in loader.units[u])
    # Examples drawn per source over one epoch: weight x prepared, exactly (the epoch uses all 216 units).
    assert loader.steps_per_epoch * 2 == 216 and drawn == Counter({0: 108, 1: 108})
    lines = loader.mixture_lines(data)
    assert lines[1].startswith("  short: 108 train examples") and "12 eval; drawn 108" in lines[1]
    assert "6 eval; drawn 108" in lines[2]


def test_per_source_masking_and_the_eval_split_follow_each_source(tmp_path, tiny_tokenizer):
    paths = [chats(tmp_path / "a.jsonl", 20, 2), chats(tmp_path / "b.jsonl", 20, 2)]
    cfg = DataConfig(sources=[SourceConfig(path=paths[0]), SourceConfig(path=paths[1], train_on="all")], eval_fraction=0, num_proc=1)
    data = prepare_data(cfg, ChatRenderer(tiny_tokenizer, "assistant"), 0, 0)
    a, b = data.train[0], data.train[20]
    assert data.train.source_index[0] == 0 and data.train.source_index[20] == 1
    assert a.input_ids == b.input_ids[: len(a.input_ids)] or len(a.input_ids) == len(b.input_ids)
    assert IGNORE_INDEX in a.labels and IGNORE_INDEX not in b.labels  # train_on=all trains the prompt too


def test_group_loss_sums_add_up_to_the_loss_and_equal_each_source_alone():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    targets = shift_labels(torch.randint(0, 11, (2, 7)))
    targets[0, :2] = IGNORE_INDEX
    groups = torch.tensor([[0, 0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 0, 0, -1]])
    total, per_group = group_loss_sums(logits, targets, groups, 3)
    assert torch.allclose(total, token_loss_sum(logits, targets))
    for g in range(3):
        alone = torch.where(groups == g, targets, IGNORE_INDEX)
        assert torch.allclose(per_group[g], token_loss_sum(logits, alone), atol=1e-6)
    # The chunked head gives the same per-group sums (chunk of 3 rows: several chunks).
    hidden, weight = torch.randn(2, 7, 5), torch.randn(11, 5)
    sums = torch.zeros(3)
    chunked = chunked_token_loss_sum(hidden, weight, targets, 3, use_liger=False, groups=groups, group_sums=sums)
    plain_total, plain_groups = group_loss_sums(hidden @ weight.T, targets, groups, 3)
    assert torch.allclose(chunked, plain_total, atol=1e-5) and torch.allclose(sums, plain_groups, atol=1e-5)


def test_source_losses_count_each_trained_token_once_and_skip_empty_sources():
    targets = torch.tensor([[5, 6, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 7, 8, IGNORE_INDEX]])
    groups = torch.tensor([[0, 0, -1, -1], [1, 1, 1, -1]])
    acc = SourceLosses(["a", "b", "c"])
    acc.add(torch.tensor([3.0, 4.0, 0.0]), targets, groups)
    assert acc.tokens.tolist() == [2.0, 2.0, 0.0]
    assert acc.losses(acc.as_list()) == {"a": 1.5, "b": 2.0}


def test_eval_batches_carry_the_sources_and_filler_batches_none(tmp_path, tiny_tokenizer):
    _, data = mixture(tmp_path, tiny_tokenizer, [1.0, 1.0])
    shards = [list(eval_batches(data.eval, rank, 2, 4, 0, 2)) for rank in (0, 1)]
    for shard in shards:
        for batch, _ in shard:  # a source on every target of a real token, none after the last one
            real = batch["attention_mask"].bool()
            assert torch.equal(batch["target_sources"][:, :-1] >= 0, real[:, 1:]) and (batch["target_sources"][:, -1] == -1).all()
    seen = Counter()
    for shard in shards:
        for batch, _ in shard:
            seen.update(batch["target_sources"][:, 0].tolist())
    assert seen[0] == 12 and seen[1] == 6


def test_per_source_losses_round_trip_through_metrics_jsonl():
    step = StepRecord(
        step=3, epoch=0, loss=1.0, lr=1e-4, grad_norm=1.0, tokens=10, input_tokens=20, tokens_seen=60, tokens_per_s=1.0,
        input_tokens_per_s=2.0, padding_efficiency=1.0, step_time_s=1.0, samples_per_s=1.0, batch_fingerprint=7, tflops_per_gpu=0.1,
        mfu=None, source_loss={"code": 0.5, "chat": 1.25},
    )  # fmt: skip
    line = record_to_dict(step)
    assert line["loss/code"] == 0.5 and line["loss/chat"] == 1.25 and "source_loss" not in line
    assert record_from_dict(json.loads(json.dumps(line))) == step
    evaluation = EvalRecord(step=3, eval_loss=1.0, eval_tokens=9, source_eval_loss={"code": 0.75})
    assert record_from_dict(record_to_dict(evaluation)) == evaluation
    plain = record_to_dict(EvalRecord(step=3, eval_loss=1.0, eval_tokens=9))
    assert not any(k.startswith("eval_loss/") for k in plain)


def test_sources_compose_from_the_command_line(tmp_path):
    a, b = chats(tmp_path / "a.jsonl", 2), chats(tmp_path / "b.jsonl", 2)
    job = compose_job(
        ["+exp=tiny_cpu", "data.path=null", "data.eval_path=null", f"data.sources=[{{path: {a}, weight: 2}}, {{path: {b}, name: bee}}]"]
    )
    assert [(s.name, s.weight) for s in data_sources(job.data)] == [("a", 2.0), ("bee", 1.0)]


def test_target_sources_are_cut_with_the_targets_under_sequence_parallelism():
    from dtrain.data.loader import sequence_shard, with_target_sources, with_targets

    labels = torch.tensor([[IGNORE_INDEX, 11, 12, IGNORE_INDEX, 14]])
    batch = with_targets({"input_ids": torch.tensor([[10, 11, 12, 13, 14]]), "labels": labels})
    batch = with_target_sources(batch, torch.tensor([[0, 0, 0, 1, 1]]))
    pieces = [sequence_shard(batch, r, 2, pad_token_id=0) for r in (0, 1)]
    targets = torch.cat([p["targets"] for p in pieces], dim=1)
    sources = torch.cat([p["target_sources"] for p in pieces], dim=1)
    assert targets.tolist() == [[11, 12, IGNORE_INDEX, 14, IGNORE_INDEX, IGNORE_INDEX]]
    assert sources.tolist() == [[0, 0, 1, 1, -1, -1]]  # each target keeps its own example's source across the cut
