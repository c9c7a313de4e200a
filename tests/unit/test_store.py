"""The token store: the same examples as the list-based path it replaced, read on access, never materialised."""

import hashlib
import json
import tracemalloc
from contextlib import closing
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from dtrain.config.batch import BatchPlan
from dtrain.config.schema import DataConfig, LengthGrouping, OnInvalid, Truncation
from dtrain.data import IGNORE_INDEX, ChatRenderer, TokenizedExample, TokenStore, open_store, prepare_data, resolve_chat_template
from dtrain.data.loader import TrainLoader
from dtrain.data.store import pack_examples, write_meta

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path("dtrain/assets/data")  # relative to the repository: the digests include the examples' names
DEFECTS = Path("tests/assets/defects.jsonl")

# sha256 (first 16 hex digits) of every example's (name, input ids, labels, last turn, truncated), train then eval,
# then the prompts and the drop/truncation counts, as produced by the list-based path before the token store
# (commit 2f50aea, data.num_proc=1). The store must reproduce them exactly.
BEFORE_THE_STORE = {
    "bundled": ("3a30139082d193e0", 3000, 200),
    "bundled_split": ("a3f1dd9d63e9b322", 2700, 300),
    "defects": ("1d18c60caa688610", 2, 0),
}


def digest(data) -> tuple[str, int, int]:
    h = hashlib.sha256()
    for split in (data.train, data.eval):
        for e in split:
            h.update(
                json.dumps([e.source, list(e.input_ids), list(e.labels), list(e.last_turn) if e.last_turn else None, e.truncated]).encode()
            )
    h.update(json.dumps([[p.source, p.messages, p.reference] for p in data.prompts]).encode())
    h.update(json.dumps([sorted(data.dropped.items()), sorted(data.truncated.items())]).encode())
    return h.hexdigest()[:16], len(data.train), len(data.eval)


CONFIGS = {
    "bundled": (dict(path=str(ASSETS / "train.jsonl"), eval_path=str(ASSETS / "eval.jsonl")), 0, 4),
    "bundled_split": (dict(path=str(ASSETS / "train.jsonl"), eval_fraction=0.1, max_seq_len=64, truncation=Truncation.truncate), 3, 4),
    "defects": (dict(path=str(DEFECTS), on_invalid=OnInvalid.skip, max_invalid_fraction=1.0, eval_fraction=0.0), 1, 2),
}


@pytest.mark.parametrize("num_proc", [1, 2])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_store_gives_the_examples_of_the_path_it_replaced(name, num_proc, tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(REPO)
    fields, seed, prompts = CONFIGS[name]
    resolve_chat_template(tiny_tokenizer, None)
    data = prepare_data(DataConfig(**fields, num_proc=num_proc), ChatRenderer(tiny_tokenizer, "assistant"), seed, prompts)
    assert isinstance(data.train, TokenStore)
    assert digest(data) == BEFORE_THE_STORE[name]


def test_per_example_arrays_agree_with_the_examples(tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(REPO)
    data = prepare_data(
        DataConfig(path=str(ASSETS / "train.jsonl"), eval_fraction=0.1, num_proc=1), ChatRenderer(tiny_tokenizer, "assistant"), 0, 2
    )
    store = data.train
    for i in (0, 1, len(store) // 2, len(store) - 1):
        e = store[i]
        assert store.lengths[i] == len(e.input_ids) and store.num_trained[i] == e.num_trained and store.name(i) == e.source
    assert store.num_tokens == int(store.lengths.sum()) and data.max_token_id == max(max(e.input_ids) for e in store)
    assert [e.source for e in store[2:5]] == [store[k].source for k in (2, 3, 4)] and store[-1].source == store[len(store) - 1].source


def test_a_label_that_is_not_its_token_cannot_be_stored():
    with pytest.raises(ValueError, match="label differs"):
        pack_examples([TokenizedExample("x:1", [5, 6, 7], [IGNORE_INDEX, 6, 8])])


def synthetic_store(folder: Path, num_examples: int, length: int) -> None:
    """A store of ``num_examples`` examples of ``length`` tokens, written with numpy (no Python list per token)."""
    folder.mkdir()
    tokens = num_examples * length
    rng = np.random.default_rng(0)
    rng.integers(3, 250, tokens, dtype=np.int32).tofile(folder / "train.ids")
    trained = np.zeros((num_examples, length), np.uint8)
    trained[:, length // 2 :] = 1
    trained.tofile(folder / "train.trained")
    (np.arange(num_examples + 1, dtype=np.int64) * length).tofile(folder / "train.offsets")
    np.full(num_examples, length - length // 2, np.int32).tofile(folder / "train.trained_n")
    np.zeros(num_examples, np.int16).tofile(folder / "train.source")
    np.full((num_examples, 2), -1, np.int32).tofile(folder / "train.last_turn")
    np.zeros(num_examples, np.uint8).tofile(folder / "train.truncated")
    names = [f"big.jsonl:{i + 1}".encode() for i in range(num_examples)]
    np.frombuffer(b"".join(names), np.uint8).tofile(folder / "train.names")
    np.concatenate([[0], np.cumsum([len(n) for n in names])]).astype(np.int64).tofile(folder / "train.name_off")
    for name in ("ids", "trained", "offsets", "trained_n", "source", "last_turn", "truncated", "names", "name_off"):
        np.zeros(1 if name in ("offsets", "name_off") else 0, {"offsets": np.int64, "name_off": np.int64}.get(name, np.uint8)).tofile(
            folder / f"eval.{name}"
        )
    split = {"examples": num_examples, "tokens": tokens, "max_token_id": 249}
    write_meta(folder, {"train": split, "eval": {"examples": 0, "tokens": 0, "max_token_id": -1}} | EMPTY_META)


EMPTY_META = {"prompts": [], "dropped": {}, "truncated": {}, "split": {}, "sources": ["big"]}


@pytest.mark.parametrize("packing", [False, True])
def test_training_from_a_large_store_does_not_materialise_the_corpus(tmp_path, packing):
    # 8M tokens: as Python lists of ids and labels that would be over 130 MB (8 bytes per list slot alone).
    num_examples, length = 40_000, 200
    synthetic_store(tmp_path / "store", num_examples, length)
    tracemalloc.start()
    try:
        store = open_store(tmp_path / "store").train
        loader = TrainLoader(
            store,
            BatchPlan(4, 2, 2),
            0,
            packing=packing,
            max_seq_len=1024,
            seed=0,
            grouping=LengthGrouping.within_step,
            pad_token_id=0,
        )
        with closing(loader.step_batches(0)) as steps:
            batches = list(islice(steps, 3))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert batches[0].stats.real_tokens == batches[0].stats.token_slots == (4 * 2 * (5 if packing else 1)) * length
    # Per-example bookkeeping (lengths, units, the epoch's shuffled order) is all
    # that is allocated (packing: the packer's rows, about 110 bytes per example); the tokens stay in the mapped files.
    assert peak < 200 * num_examples, f"peak {peak / 1e6:.1f} MB allocated for a store of {store.num_tokens} tokens"
