"""Invalid records: the first one stops the run with its line (on_invalid=error), or all are skipped and counted."""

from collections import Counter
from pathlib import Path

import pytest

from dtrain.config.schema import DataConfig, OnInvalid, TrainOn
from dtrain.data import ChatRenderer, DataError, prepare_data

DEFECTS = Path(__file__).resolve().parents[1] / "assets" / "defects.jsonl"
EXPECTED_SKIPS = Counter(
    {
        "invalid: malformed JSON": 1,
        "invalid: missing field 'messages'": 1,
        "invalid: unknown role": 1,
        "invalid: non-alternating roles": 1,
        "invalid: empty assistant content": 1,
        "invalid: no assistant turn": 1,
        "invalid: non-string content": 1,
        "invalid: not a JSON object": 1,
    }
)


def config(**kw) -> DataConfig:
    return DataConfig(path=str(DEFECTS), eval_fraction=0.0, **kw)


def test_error_mode_reports_the_first_defect_with_its_line(tiny_tokenizer):
    with pytest.raises(DataError) as err:
        prepare_data(config(), ChatRenderer(tiny_tokenizer, TrainOn.assistant), seed=0, num_prompts=0)
    assert f"{DEFECTS}:2: malformed JSON" in str(err.value)
    assert "data.on_invalid=skip" in str(err.value)


def test_skip_mode_counts_each_reason_exactly(tiny_tokenizer):
    data = prepare_data(
        config(on_invalid=OnInvalid.skip, max_invalid_fraction=0.9), ChatRenderer(tiny_tokenizer, TrainOn.assistant), seed=0, num_prompts=0
    )
    assert data.dropped == EXPECTED_SKIPS
    assert [e.source for e in data.train] == [f"{DEFECTS}:1", f"{DEFECTS}:10"]


def test_skip_mode_still_stops_past_the_invalid_fraction(tiny_tokenizer):
    with pytest.raises(DataError, match=r"8 of 10 records are invalid .*max_invalid_fraction=0.5"):
        prepare_data(
            config(on_invalid=OnInvalid.skip, max_invalid_fraction=0.5),
            ChatRenderer(tiny_tokenizer, TrainOn.assistant),
            seed=0,
            num_prompts=0,
        )


# One record of each kind of defect that tool calling, per-message flags and ShareGPT bring, between good records;
# the format of each file is detected (data.format=auto).
NEW_DEFECTS = {
    "defects_tools.jsonl": Counter(
        {
            "invalid: invalid tool_calls": 1,
            "invalid: tool call arguments not JSON": 1,
            "invalid: tool result without a tool call": 1,
            "invalid: train flag not a boolean": 1,
            "invalid: empty assistant content": 1,
            "invalid: no trained turn": 1,
            "invalid: invalid tools": 1,
            "invalid: non-alternating roles": 1,
        }
    ),
    "defects_sharegpt.jsonl": Counter(
        {
            "invalid: function_call not JSON": 1,
            "invalid: unknown role": 1,
            "invalid: missing field 'from'": 1,
            "invalid: tool result without a tool call": 1,
            "invalid: missing field 'conversations'": 1,
        }
    ),
}
FIRST_DEFECT = {"defects_tools.jsonl": "2: invalid tool_calls (message 1", "defects_sharegpt.jsonl": "2: function_call not JSON (message 1"}


@pytest.mark.parametrize("name", sorted(NEW_DEFECTS))
def test_new_record_defects_are_counted_per_reason_and_named_by_line(name, tiny_tokenizer):
    path = DEFECTS.parent / name
    renderer = ChatRenderer(tiny_tokenizer, TrainOn.assistant)
    cfg = DataConfig(path=str(path), eval_fraction=0.0, on_invalid=OnInvalid.skip, max_invalid_fraction=0.9)
    data = prepare_data(cfg, renderer, seed=0, num_prompts=0)
    assert data.dropped == NEW_DEFECTS[name]
    lines = sum(1 for _ in path.open())
    assert [e.source for e in data.train] == [f"{path}:1", f"{path}:{lines}"]
    assert data.formats == {path.stem: f"{'sharegpt' if 'sharegpt' in name else 'messages'} (detected)"}
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(path=str(path), eval_fraction=0.0), renderer, seed=0, num_prompts=0)
    assert f"{path}:{FIRST_DEFECT[name]}" in str(err.value)
