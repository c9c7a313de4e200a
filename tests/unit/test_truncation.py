"""data.truncation: drop, truncate and error behave as named; nothing without a trained token reaches the loop."""

import json

import pytest

from dtrain.config.schema import DataConfig, TrainOn, Truncation
from dtrain.data import IGNORE_INDEX, ChatRenderer, DataError, prepare_data

LONG_PROMPT = {"messages": [{"role": "user", "content": "upper: " + "x" * 200}, {"role": "assistant", "content": "SHORT"}]}
LONG_ANSWER = {"messages": [{"role": "user", "content": "repeat: ab"}, {"role": "assistant", "content": "ab " * 100}]}
SHORT = {"messages": [{"role": "user", "content": "upper: ab"}, {"role": "assistant", "content": "AB"}]}


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (LONG_PROMPT, LONG_ANSWER, SHORT)))
    return path


def prepare(tokenizer, path, policy, max_len=64):
    cfg = DataConfig(path=str(path), eval_fraction=0.0, max_seq_len=max_len, truncation=policy)
    return prepare_data(cfg, ChatRenderer(tokenizer, TrainOn.assistant), seed=0, num_prompts=0)


def test_drop_counts_every_overlong_example(tiny_tokenizer, data_file):
    data = prepare(tiny_tokenizer, data_file, Truncation.drop)
    assert [e.source.rsplit(":", 1)[1] for e in data.train] == ["3"]
    assert data.dropped["longer than max_seq_len"] == 2


def test_error_names_the_example(tiny_tokenizer, data_file):
    with pytest.raises(DataError, match=rf"{data_file}:1: \d+ tokens > data.max_seq_len=64"):
        prepare(tiny_tokenizer, data_file, Truncation.error)


def test_truncate_keeps_the_prompt_head_and_the_whole_answer(tiny_tokenizer, data_file):
    data = prepare(tiny_tokenizer, data_file, Truncation.truncate)
    assert data.truncated["truncated to max_seq_len"] == 2 and not data.dropped
    long_prompt, long_answer, short = data.train
    for e in data.train:
        assert len(e.input_ids) <= 64 and e.num_trained > 0
    text = tiny_tokenizer.decode(long_prompt.input_ids)
    assert text.startswith("<|im_start|>user\nupper: xxx")  # the prompt's head
    assert text.endswith("<|im_start|>assistant\nSHORT<|im_end|>")  # the last turn, header and end token included
    trained = [t for t, label in zip(long_prompt.input_ids, long_prompt.labels) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(trained) == "SHORT<|im_end|>"
    # An answer longer than the budget keeps its beginning (and the turn header), still trained.
    assert tiny_tokenizer.decode(long_answer.input_ids).startswith("<|im_start|>assistant\nab ab")
    assert short.input_ids == ChatRenderer(tiny_tokenizer, TrainOn.assistant).render(SHORT["messages"]).input_ids


def test_truncation_that_leaves_no_trained_token_drops_and_counts(tiny_tokenizer, data_file):
    # "<|im_start|>assistant\n" is 11 tokens: with 12 one answer token survives, with 11 none does.
    data = prepare(tiny_tokenizer, data_file, Truncation.truncate, max_len=12)
    assert [e.num_trained for e in data.train] == [1, 1, 1]
    with pytest.raises(DataError, match=r"every example was dropped \(\{'no trained token left after truncation': 3\}\)"):
        prepare(tiny_tokenizer, data_file, Truncation.truncate, max_len=11)
