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

import hydra
from omegaconf import DictConfig

from dtrain.config import register_configs, to_job_config
from dtrain.data.prepare import prepare_job_store
from dtrain.errors import exit_on_error

VERIFY_FLAG = "--verify"
verify_checksums = False


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    job = to_job_config(cfg)
    with exit_on_error():
        summary = prepare_job_store(job, verify_checksums)
    if summary.pop("already_prepared"):
        verified = " (verified: every file's size and CRC-32 match its meta.json)"
        print(f"already prepared: {summary['store']}" + (verified if verify_checksums or job.data.verify_store else ""))
    print(json.dumps(summary, indent=1))
    print(f"train from it with the same settings, or anywhere with: data.prepared_path={summary['store']}")


if __name__ == "__main__":
    verify_checksums = VERIFY_FLAG in sys.argv[1:]
    sys.argv = [a for a in sys.argv if a != VERIFY_FLAG]
    register_configs()
    main()
