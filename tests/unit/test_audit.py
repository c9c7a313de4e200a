"""The start-up mask audit passes real data and stops on a broken mask with the example shown."""

import dataclasses

import pytest

from dtrain.config.schema import TrainOn
from dtrain.data import IGNORE_INDEX, ChatRenderer, DataError
from dtrain.data.audit import audit_masks

CONV = [{"role": "user", "content": "upper: ab"}, {"role": "assistant", "content": "AB"}]


def test_rendered_examples_pass(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer, TrainOn.assistant)
    assert audit_masks([renderer.render(CONV, f"x:{i}") for i in range(3)], renderer, seed=0) == 3


def test_an_untrained_end_token_fails_with_the_example_shown(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer, TrainOn.assistant)
    good = renderer.render(CONV, "data.jsonl:7")
    eot = good.labels.index(renderer.end_of_turn_id)
    broken = dataclasses.replace(good, labels=good.labels[:eot] + [IGNORE_INDEX] + good.labels[eot + 1 :])
    with pytest.raises(DataError, match=r"data.jsonl:7: mask audit failed: .*would not learn to stop") as err:
        audit_masks([good, broken], renderer, seed=0)
    assert "[[AB]]" in str(err.value)


def test_an_untrained_example_fails(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer, TrainOn.assistant)
    good = renderer.render(CONV, "data.jsonl:9")
    with pytest.raises(DataError, match="no token is trained"):
        audit_masks([dataclasses.replace(good, labels=[IGNORE_INDEX] * len(good.labels))], renderer, seed=0)


def test_truncated_answer_without_its_end_token_is_accepted(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer, TrainOn.assistant)
    cut = renderer.truncate(renderer.render([CONV[0], {"role": "assistant", "content": "A" * 50}]), 30)
    assert cut.truncated and cut.input_ids[-1] != renderer.end_of_turn_id
    assert audit_masks([cut], renderer, seed=0) == 1


def test_an_end_token_trained_inside_an_answer_fails(tiny_tokenizer):
    """The control token spelled in an answer and trained as the token: the model would learn to stop mid-answer."""
    renderer = ChatRenderer(tiny_tokenizer, TrainOn.assistant)
    good = renderer.render(CONV, "data.jsonl:8")
    start = next(i for i, label in enumerate(good.labels) if label != IGNORE_INDEX)
    ids = good.input_ids[: start + 1] + [renderer.end_of_turn_id] + good.input_ids[start + 1 :]
    labels = good.labels[: start + 1] + [renderer.end_of_turn_id] + good.labels[start + 1 :]
    with pytest.raises(DataError, match=r"data.jsonl:8: mask audit failed: the end-of-turn token is trained inside"):
        audit_masks([dataclasses.replace(good, input_ids=ids, labels=labels)], renderer, seed=0)
