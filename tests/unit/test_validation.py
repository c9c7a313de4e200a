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
