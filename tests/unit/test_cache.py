"""Tokenise once: a second preparation with the same inputs reads the cache and yields identical data."""

import pytest

import dtrain.data.cache as cache
from dtrain.config import compose_job
from dtrain.data import ChatRenderer, DataError


def load(job, tokenizer, monkeypatch=None, forbid_tokenising=False):
    if forbid_tokenising:
        monkeypatch.setattr(cache, "prepare_data", lambda *a, **k: pytest.fail("re-tokenised despite a cache entry"))
    renderer = ChatRenderer(tokenizer, job.data.train_on)
    return cache.load_or_prepare(job.data, renderer, job.train.seed, 4, is_local_main=True, barrier=lambda: None)


def test_second_run_reads_the_cache_and_gets_identical_tensors(tmp_path, tiny_tokenizer, monkeypatch):
    job = compose_job(["+exp=tiny_cpu", f"data.cache_dir={tmp_path}"])
    first = load(job, tiny_tokenizer)
    assert len(list(tmp_path.iterdir())) == 1
    second = load(job, tiny_tokenizer, monkeypatch, forbid_tokenising=True)
    assert second.train == first.train and second.eval == first.eval
    assert second.prompts == first.prompts and second.dropped == first.dropped


def test_a_changed_data_setting_is_a_new_entry(tmp_path, tiny_tokenizer):
    load(compose_job(["+exp=tiny_cpu", f"data.cache_dir={tmp_path}"]), tiny_tokenizer)
    other = load(compose_job(["+exp=tiny_cpu", f"data.cache_dir={tmp_path}", "data.train_on=all"]), tiny_tokenizer)
    assert len(list(tmp_path.iterdir())) == 2
    assert other.train[0].labels == other.train[0].input_ids


def test_bad_data_reaches_every_rank_as_an_error(tmp_path, tiny_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    job = compose_job(["+exp=tiny_cpu", f"data.cache_dir={tmp_path / 'c'}", f"data.path={bad}", "data.eval_path=null",
                       "data.eval_fraction=0"])
    with pytest.raises(DataError, match="no assistant turn"):
        load(job, tiny_tokenizer)
    renderer = ChatRenderer(tiny_tokenizer, job.data.train_on)
    with pytest.raises(DataError, match="no assistant turn"):  # a non-main rank reads the error left for it
        cache.load_or_prepare(job.data, renderer, job.train.seed, 4, is_local_main=False, barrier=lambda: None)


def test_parallel_tokenisation_gives_the_same_data(tiny_tokenizer):
    from dtrain.data import prepare_data

    single = compose_job(["+exp=tiny_cpu", "data.cache_dir=null"])
    parallel = compose_job(["+exp=tiny_cpu", "data.cache_dir=null", "data.num_proc=2"])
    renderer = ChatRenderer(tiny_tokenizer, single.data.train_on)
    a = prepare_data(single.data, renderer, 0, 4)
    b = prepare_data(parallel.data, renderer, 0, 4)
    assert a.train == b.train and a.eval == b.eval and a.dropped == b.dropped
