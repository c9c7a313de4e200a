"""Prepare a job's corpus into its token store, or check the one already there: what ``launch/prepare.py`` runs."""

from __future__ import annotations

import uuid

from dtrain.config.checks import check_data_sources
from dtrain.config.schema import JobConfig
from dtrain.data.cache import check_identity, check_store, claim_store, store_folder, store_identity, write_store
from dtrain.data.dataset import open_store
from dtrain.data.store import META, read_meta
from dtrain.errors import ConfigError, DataError
from dtrain.setup import load_renderer


def prepare_job_store(job: JobConfig, verify_checksums: bool = False, progress: bool = True) -> dict:
    """Write ``job``'s token store (tokenizer only: no weights, no DeepSpeed), or check the one already prepared.

    A store another process is preparing is waited for (its lock file); a damaged ``data.cache_dir`` entry whose raw
    data is here is moved aside and prepared again.

    Args:
        job: The composed job; its ``data`` section and tokenizer decide the store.
        verify_checksums: Re-read an existing store and compare every file's CRC-32 with its ``meta.json`` (as
            ``data.verify_store=true`` does); sizes are always checked.
        progress: Show the preparation's progress bar.

    Returns:
        The summary ``launch/prepare.py`` prints: the store's folder, records, examples and tokens per split and per
        source, formats, drops, truncations, preparation speed, and ``already_prepared``.

    Raises:
        ConfigError: No folder to write the store to.
        DataError: A bad record, or a damaged store (the file, and the expected and found size or checksum).
    """
    check_data_sources(job.data)
    renderer = load_renderer(job)
    args = (job.data, renderer, job.train.seed, job.generate.num_prompts)
    folder = store_folder(*args)
    if folder is None:
        raise ConfigError("nowhere to write the store: set data.prepared_path=<folder> (or data.cache_dir)")
    checksums = verify_checksums or job.data.verify_store
    problem = check_store(folder, job.data, checksums) if (folder / META).is_file() else None
    if problem:
        raise DataError(problem)
    # Asked again: check_store moves a damaged data.cache_dir entry whose raw data is here aside, to prepare it anew.
    lock = claim_store(folder, token=uuid.uuid4().hex) if not (folder / META).is_file() else None
    if lock is not None:
        try:
            write_store(*args, folder, progress=progress)
        finally:
            lock.release()
    else:
        check_identity(folder, store_identity(*args))
    data, meta = open_store(folder), read_meta(folder)
    sources = {}
    for name_index, name in enumerate(data.source_names):
        mask = data.train.source_index == name_index
        sources[name] = {"train_examples": int(mask.sum()), "train_tokens": int(data.train.lengths[mask].sum())}
    return {
        "store": str(folder),
        "already_prepared": lock is None,
        "records": meta["records"],
        "train": {"examples": len(data.train), "tokens": data.train.num_tokens, "trained_tokens": int(data.train.num_trained.sum())},
        "eval": {"examples": len(data.eval), "tokens": data.eval.num_tokens},
        "sources": sources,
        "formats": data.formats,
        "dropped": meta["dropped"],
        "truncated": meta["truncated"],
        "prepare": meta["prepare"],
    }
