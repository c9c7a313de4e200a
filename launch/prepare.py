"""Prepare a corpus once, ahead of training: the data half of a config, in parallel, into a token store.

    python launch/prepare.py +exp=tiny_cpu                                  # into data.cache_dir, found by key
    python launch/prepare.py +exp=7b_zero3 data.path=/data/sft/ data.prepared_path=/shared/sft-7b data.num_proc=32
    python launch/prepare.py --verify data.prepared_path=/shared/sft-7b ...   # re-read every file, compare checksums

Loads the tokenizer only (no model weights, no GPU, no DeepSpeed launch). Training with the same settings finds
the store by its key under ``data.cache_dir``, or at ``data.prepared_path``; a store prepared from other settings is
refused there, naming what differs. A store another process is preparing is waited for (its lock file), one whose
preparer died is prepared again. ``--verify`` (or ``data.verify_store=true``) re-reads an existing store and
compares every file's size and CRC-32 with its ``meta.json``: exit code 2 naming the damaged file.
"""

from __future__ import annotations

import json
import sys
import uuid

import hydra
from omegaconf import DictConfig

from dtrain.config import register_configs, to_job_config
from dtrain.config.checks import check_data_sources
from dtrain.data import open_store
from dtrain.data.cache import check_identity, check_store, claim_store, store_folder, store_identity, write_store
from dtrain.data.store import META, read_meta
from dtrain.errors import ConfigError, DataError, exit_on_error
from dtrain.setup import load_renderer

VERIFY_FLAG = "--verify"
verify_checksums = False


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    job = to_job_config(cfg)
    with exit_on_error():
        check_data_sources(job.data)
        renderer = load_renderer(job)
        args = (job.data, renderer, job.train.seed, job.generate.num_prompts)
        folder = store_folder(*args)
        if folder is None:
            raise ConfigError("nowhere to write the store: set data.prepared_path=<folder> (or data.cache_dir)")
        checksums = verify_checksums or job.data.verify_store
        # A damaged data.cache_dir entry whose raw data is here is moved aside and prepared again below.
        problem = check_store(folder, job.data, checksums) if (folder / META).is_file() else None
        if problem:
            raise DataError(problem)
        lock = claim_store(folder, token=uuid.uuid4().hex) if not (folder / META).is_file() else None
        if lock is not None:
            try:
                write_store(*args, folder, progress=True)
            finally:
                lock.release()
        else:
            check_identity(folder, store_identity(*args))
            print(f"already prepared: {folder}" + (" (verified: every file's size and CRC-32 match its meta.json)" if checksums else ""))
        data, meta = open_store(folder), read_meta(folder)
    sources = {}
    for name_index, name in enumerate(data.source_names):
        mask = data.train.source_index == name_index
        sources[name] = {"train_examples": int(mask.sum()), "train_tokens": int(data.train.lengths[mask].sum())}
    summary = {
        "store": str(folder),
        "records": meta["records"],
        "train": {"examples": len(data.train), "tokens": data.train.num_tokens, "trained_tokens": int(data.train.num_trained.sum())},
        "eval": {"examples": len(data.eval), "tokens": data.eval.num_tokens},
        "sources": sources,
        "formats": data.formats,
        "dropped": meta["dropped"],
        "truncated": meta["truncated"],
        "prepare": meta["prepare"],
    }
    print(json.dumps(summary, indent=1))
    print(f"train from it with the same settings, or anywhere with: data.prepared_path={folder}")


if __name__ == "__main__":
    verify_checksums = VERIFY_FLAG in sys.argv[1:]
    sys.argv = [a for a in sys.argv if a != VERIFY_FLAG]
    register_configs()
    main()
