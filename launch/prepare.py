"""Prepare a corpus once, ahead of training: the data half of a config, in parallel, into a token store.

    python launch/prepare.py +exp=tiny_cpu                                  # into data.cache_dir, found by key
    python launch/prepare.py +exp=7b_zero3 data.path=/data/sft/ data.prepared_path=/shared/sft-7b data.num_proc=32

Loads the tokenizer only (no model weights, no GPU, no DeepSpeed launch). Training with the same settings finds
the store by its key under ``data.cache_dir``, or at ``data.prepared_path``; a store prepared from other settings is
refused there, naming what differs.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from dtrain.config import register_configs, to_job_config
from dtrain.config.checks import check_data_sources
from dtrain.data import open_store
from dtrain.data.cache import check_identity, store_folder, store_identity, write_store
from dtrain.data.store import META, read_meta
from dtrain.errors import ConfigError, exit_on_error
from dtrain.setup import load_renderer


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
        if (folder / META).is_file():
            check_identity(folder, store_identity(*args))
            print(f"already prepared: {folder}")
        else:
            write_store(*args, folder, progress=True)
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
    register_configs()
    main()
