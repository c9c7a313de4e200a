"""Prepare once: a second run with the same inputs maps the same token store and yields identical data."""

import shutil

import pytest

import dtrain.data.cache as cache
from dtrain.config import compose_job
from dtrain.data import ChatRenderer, DataError, PreparedData


def load(job, tokenizer, monkeypatch=None, forbid_tokenising=False):
    if forbid_tokenising:
        monkeypatch.setattr(cache, "prepare_store", lambda *a, **k: pytest.fail("re-tokenised despite a cache entry"))
    renderer = ChatRenderer(tokenizer, job.data.train_on)
    return cache.load_or_prepare(job.data, renderer, job.train.seed, 4, is_local_main=True, barrier=lambda: None)


def test_second_run_reads_the_cache_and_gets_identical_tensors(tmp_path, tiny_tokenizer, monkeypatch):
    job = compose_job(["+exp=tiny_cpu", f"data.cache_dir={tmp_path}"])
    first = load(job, tiny_tokenizer)
    assert len(list(tmp_path.iterdir())) == 1
    second = load(job, tiny_tokenizer, monkeypatch, forbid_tokenising=True)
    assert list(second.train) == list(first.train) and list(second.eval) == list(first.eval)
    assert second.prompts == first.prompts and second.dropped == first.dropped


def test_a_changed_data_setting_is_a_new_entry(tmp_path, tiny_tokenizer):
    load(compose_job(["+exp=tiny_cpu", f"data.cache_dir={tmp_path}"]), tiny_tokenizer)
    other = load(compose_job(["+exp=tiny_cpu", f"data.cache_dir={tmp_path}", "data.train_on=all"]), tiny_tokenizer)
    assert len(list(tmp_path.iterdir())) == 2
    assert other.train[0].labels == other.train[0].input_ids


def test_bad_data_reaches_every_rank_as_an_error(tmp_path, tiny_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    job = compose_job(
        ["+exp=tiny_cpu", f"data.cache_dir={tmp_path / 'c'}", f"data.path={bad}", "data.eval_path=null", "data.eval_fraction=0"]
    )
    with pytest.raises(DataError, match="no assistant turn"):
        load(job, tiny_tokenizer)
    renderer = ChatRenderer(tiny_tokenizer, job.data.train_on)
    with pytest.raises(DataError, match="no assistant turn"):  # a non-main rank reads the error left for it
        cache.load_or_prepare(job.data, renderer, job.train.seed, 4, is_local_main=False, barrier=lambda: None)


def test_parallel_tokenisation_gives_the_same_data(tiny_tokenizer):
    from dtrain.data import prepare_data

    single = compose_job(["+exp=tiny_cpu", "data.cache_dir=null", "data.num_proc=1"])
    parallel = compose_job(["+exp=tiny_cpu", "data.cache_dir=null", "data.num_proc=2"])
    renderer = ChatRenderer(tiny_tokenizer, single.data.train_on)
    a = prepare_data(single.data, renderer, 0, 4)
    b = prepare_data(parallel.data, renderer, 0, 4)
    assert list(a.train) == list(b.train) and list(a.eval) == list(b.eval) and a.dropped == b.dropped
    assert a.prompts == b.prompts


def test_on_a_shared_filesystem_one_node_tokenises_and_a_dead_jobs_lock_is_taken_over(tmp_path, tiny_tokenizer, monkeypatch, caplog):
    job = compose_job(["+exp=tiny_cpu", f"data.cache_dir={tmp_path}"])
    renderer = ChatRenderer(tiny_tokenizer, job.data.train_on)
    folder = tmp_path / cache.cache_key(job.data, renderer, job.train.seed, 4)
    lock = folder.with_name(f"{folder.name}.lock")
    lock.write_text("job-A")  # node 0 of job A is tokenising

    # Node 1's local rank 0 of the same job: no tokenising; it waits at the barrier (which returns once node 0
    # has published) and reads the entry.
    monkeypatch.setattr(cache, "prepare_store", lambda *a, **k: pytest.fail("a second node tokenised too"))
    monkeypatch.setattr(cache, "open_store", lambda f: PreparedData(f"read {f.name}", None, []))
    monkeypatch.setattr(cache, "check_identity", lambda f, identity: None)

    def barrier_until_node0_publishes():
        folder.mkdir()
        (folder / "meta.json").write_text("{}")

    out = cache.load_or_prepare(
        job.data, renderer, job.train.seed, 4, is_local_main=True, job_token="job-A", barrier=barrier_until_node0_publishes
    )
    assert out.train == f"read {folder.name}" and lock.read_text() == "job-A"  # node 0's lock left alone

    # Job A died before publishing (its lock stays): job B takes the lock over, tokenises and releases it.
    shutil.rmtree(folder)
    monkeypatch.undo()
    data = cache.load_or_prepare(job.data, renderer, job.train.seed, 4, is_local_main=True, job_token="job-B", barrier=lambda: None)
    assert len(data.train) > 0 and (folder / "meta.json").is_file() and not lock.exists()
    assert "took over" in caplog.text and "holder job-A" in caplog.text


def test_a_prepared_store_trains_without_its_raw_files_but_not_from_changed_ones(tmp_path, tiny_tokenizer):
    from dtrain.config.checks import check_data_sources

    data_file = tmp_path / "train.jsonl"
    shutil.copy(cache.Path(__file__).resolve().parents[2] / "dtrain" / "assets" / "data" / "train.jsonl", data_file)
    store = tmp_path / "store"
    job = compose_job(["+exp=tiny_cpu", f"data.path={data_file}", "data.eval_path=null", f"data.prepared_path={store}"])
    first = load(job, tiny_tokenizer)
    assert (store / "train.ids").is_file() and len(first.train) > 0

    with data_file.open("a") as f:  # the corpus changed since: its store is refused, naming what differs
        f.write('{"messages": [{"role": "user", "content": "new"}, {"role": "assistant", "content": "NEW"}]}\n')
    with pytest.raises(DataError, match=r"prepared from other settings \(they differ in: sources\)"):
        load(job, tiny_tokenizer)

    data_file.unlink()  # the raw data stayed where the store was prepared: the store alone trains
    check_data_sources(job.data)
    again = load(job, tiny_tokenizer)
    assert list(again.train[:5]) == list(first.train[:5]) and len(again.train) == len(first.train)


def test_the_format_field_mapping_and_template_arguments_key_the_store(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer, "assistant")
    base = ["+exp=tiny_cpu"]
    changes = [
        "data.format=messages",  # the bundled data reads format=auto
        "data.messages_field=dialog",
        "data.role_key=speaker",
        "data.content_key=text",
        "++data.roles={bot: assistant}",  # a dict: ++ (Hydra merges a plain override into the empty default)
        "++data.chat_template_kwargs={enable_thinking: false}",
    ]
    keys = [cache.cache_key(compose_job([*base, *change]).data, renderer, 0, 4) for change in [[], *[[c] for c in changes]]]
    assert len(set(keys)) == len(keys)
    # The same keys per source of a mixture (composed from the command line, so typed and validated like the rest).
    path = compose_job(base).data.path
    extras = ("", ", roles: {bot: assistant}", ", chat_template_kwargs: {x: 1}")
    mixtures = [["data.path=null", "data.eval_path=null", f"data.sources=[{{path: '{path}'{extra}}}]"] for extra in extras]
    jobs = [compose_job([*base, *m]) for m in mixtures]
    assert jobs[1].data.sources[0].roles == {"bot": "assistant"} and jobs[2].data.sources[0].chat_template_kwargs == {"x": 1}
    assert len({cache.cache_key(j.data, renderer, 0, 4) for j in jobs}) == 3


def test_the_store_records_sizes_and_checksums_and_refuses_a_damaged_copy(tmp_path, tiny_tokenizer):
    import zlib

    from dtrain.data.store import read_meta, store_problems

    store = tmp_path / "store"
    job = compose_job(["+exp=tiny_cpu", f"data.prepared_path={store}"])
    first = load(job, tiny_tokenizer)
    files = read_meta(store)["train"]["files"]
    assert set(files) == {"ids", "trained", "offsets", "trained_n", "source", "last_turn", "truncated", "names", "name_off"}
    for name, recorded in files.items():  # computed while writing, equal to a pass over the finished file
        data = (store / f"train.{name}").read_bytes()
        assert recorded == {"bytes": len(data), "crc32": zlib.crc32(data)}

    ids = store / "train.ids"
    original = ids.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    ids.write_bytes(bytes(flipped))  # same size: opening passes, the checksum does not
    assert list(load(job, tiny_tokenizer).train[:3]) != [] and store_problems(store) == []
    crc, recorded = zlib.crc32(bytes(flipped)), files["ids"]["crc32"]
    assert store_problems(store, checksums=True) == [
        f"{ids} has CRC-32 {crc:08x}, meta.json says {recorded:08x} (its bytes changed after it was written)"
    ]
    verifying = compose_job(["+exp=tiny_cpu", f"data.prepared_path={store}", "data.verify_store=true"])
    with pytest.raises(DataError, match=r"the token store .* is damaged: .*train.ids has CRC-32"):
        load(verifying, tiny_tokenizer)

    ids.write_bytes(original[:-100])  # a copy cut short: refused on open, naming file and sizes
    with pytest.raises(DataError, match=rf"{ids} has {len(original) - 100} bytes, meta.json says {len(original)} \(cut short"):
        load(job, tiny_tokenizer)
    ids.write_bytes(original)
    assert list(load(verifying, tiny_tokenizer).train) == list(first.train)


def test_a_damaged_cache_entry_is_rebuilt_from_the_raw_data(tmp_path, tiny_tokenizer, caplog):
    job = compose_job(["+exp=tiny_cpu", f"data.cache_dir={tmp_path}"])
    expected = list(load(job, tiny_tokenizer).train)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    ids = entry / "train.ids"
    ids.write_bytes(ids.read_bytes()[:-100])
    with caplog.at_level("WARNING", logger="dtrain"):
        again = load(job, tiny_tokenizer)
    assert f"the token store {entry} is damaged ({ids} has" in caplog.text and "preparing it again from the raw data" in caplog.text
    assert list(again.train) == expected and [p.name for p in tmp_path.iterdir()] == [entry.name]


def test_a_store_another_live_job_prepares_is_waited_for(tmp_path, tiny_tokenizer, monkeypatch, caplog):
    import json
    import os
    import socket
    import threading
    import time

    job = compose_job(["+exp=tiny_cpu", f"data.cache_dir={tmp_path}"])
    renderer = ChatRenderer(tiny_tokenizer, job.data.train_on)
    folder = tmp_path / cache.cache_key(job.data, renderer, job.train.seed, 4)
    lock = folder.with_name(f"{folder.name}.lock")
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": "job-A", "since": time.time(), "heartbeat": time.time()}
    lock.write_text(json.dumps(holder))  # a live process of job A is writing the store

    write_store = cache.write_store

    def job_a_publishes():
        time.sleep(0.5)
        write_store(job.data, renderer, job.train.seed, 4, folder)
        lock.unlink()

    publisher = threading.Thread(target=job_a_publishes)
    publisher.start()
    calls = []
    monkeypatch.setattr(cache, "write_store", lambda *a, **k: calls.append(a))
    with caplog.at_level("INFO", logger="dtrain"):
        data = cache.load_or_prepare(job.data, renderer, job.train.seed, 4, is_local_main=True, job_token="job-B", barrier=lambda: None)
    publisher.join()
    assert calls == [] and len(data.train) > 0  # job B read job A's store once published, and prepared nothing
    assert f"another job is preparing {folder} (host {socket.gethostname()}, PID {os.getpid()}" in caplog.text


def test_prepare_job_store_writes_once_then_checks_and_verifies(tmp_path):
    """What launch/prepare.py and bench/corpus.py run: the first call writes the store, the second finds it (sizes
    checked), and with checksums a flipped byte (same size) is a DataError naming the file."""
    from dtrain.data.prepare import prepare_job_store

    store = tmp_path / "store"
    job = compose_job(["+exp=tiny_cpu", f"data.prepared_path={store}", "data.num_proc=1"])
    first = prepare_job_store(job, progress=False)
    assert first["store"] == str(store)
    assert first["train"]["tokens"] > first["train"]["trained_tokens"] > 0 and first["eval"]["examples"] > 0
    assert sum(s["train_tokens"] for s in first["sources"].values()) == first["train"]["tokens"]
    again = prepare_job_store(job, verify_checksums=True, progress=False)
    assert again.pop("already_prepared") is True and first.pop("already_prepared") is False and again == first
    ids = store / "train.ids"
    raw = bytearray(ids.read_bytes())
    raw[100] ^= 0x10
    ids.write_bytes(bytes(raw))
    assert prepare_job_store(job, progress=False)["already_prepared"] is True  # sizes alone cannot see it
    with pytest.raises(DataError, match=f"{ids} has CRC-32"):
        prepare_job_store(job, verify_checksums=True, progress=False)
