"""Tokenise once: an on-disk cache of prepared data, keyed by the data files, the tokenizer and the data config.

Each node's local rank 0 builds the entry if it is missing and publishes it with an atomic rename; the other
ranks wait at a barrier and read it. On a filesystem shared by the nodes, a lock file holding the job's token
(agreed by all ranks) lets one node tokenise while the others' local rank 0 wait with everyone else; a lock left
by another (dead) job is taken over. Arrays are stored with numpy (``allow_pickle=False``), the rest as JSON,
so reading a cache never executes code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from dtrain import __version__
from dtrain.config.schema import DataConfig
from dtrain.data.chat import ChatRenderer, TokenizedExample
from dtrain.data.dataset import GenerationPrompt, PreparedData, prepare_data
from dtrain.data.sources import DATA_SUFFIXES
from dtrain.errors import DataError

log = logging.getLogger("dtrain")


def _file_identity(path: str) -> list:
    """Path, size and mtime of every data file behind ``path`` (a hub id is keyed by its name)."""
    p = Path(path).expanduser()
    files = sorted(f for f in p.iterdir() if f.suffix in DATA_SUFFIXES) if p.is_dir() else [p]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] if f.exists() else [str(f)] for f in files]


# Their bytes key the cache: a change to any of them prepares the data again.
PIPELINE_SOURCES = ("sources.py", "formats.py", "chat.py", "template_text.py", "pieces.py", "dataset.py", "cache.py")


def cache_key(cfg: DataConfig, renderer: ChatRenderer, seed: int, num_prompts: int) -> str:
    """A hash of everything that changes the prepared tensors, the data pipeline's own code included."""
    tok = renderer.tokenizer
    here = Path(__file__).parent
    identity = {
        "dtrain": __version__,
        "code": hashlib.sha256(b"".join((here / name).read_bytes() for name in PIPELINE_SOURCES)).hexdigest(),
        "data_config": json.loads(json.dumps(asdict(cfg), default=lambda v: getattr(v, "value", str(v)))),
        "files": [_file_identity(cfg.path), _file_identity(cfg.eval_path) if cfg.eval_path else None],
        "tokenizer": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
        if hasattr(tok, "backend_tokenizer")
        else tok.name_or_path,
        "chat_template": tok.chat_template,
        "special_tokens": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, renderer.end_of_turn_id],
        "seed": seed,
        "num_prompts": num_prompts,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _save_examples(examples: list[TokenizedExample], folder: Path, name: str) -> list:
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    np.save(folder / f"{name}_input_ids.npy", np.array([t for e in examples for t in e.input_ids], dtype=np.int64))
    np.save(folder / f"{name}_labels.npy", np.array([t for e in examples for t in e.labels], dtype=np.int64))
    np.save(folder / f"{name}_lengths.npy", lengths)
    return [[e.source, list(e.last_turn) if e.last_turn else None, e.truncated] for e in examples]


def _load_examples(folder: Path, name: str, meta: list) -> list[TokenizedExample]:
    ids = np.load(folder / f"{name}_input_ids.npy", allow_pickle=False).tolist()
    labels = np.load(folder / f"{name}_labels.npy", allow_pickle=False).tolist()
    lengths = np.load(folder / f"{name}_lengths.npy", allow_pickle=False).tolist()
    out, offset = [], 0
    for (source, last_turn, truncated), n in zip(meta, lengths):
        out.append(
            TokenizedExample(
                source, ids[offset : offset + n], labels[offset : offset + n], tuple(last_turn) if last_turn else None, truncated
            )
        )
        offset += n
    return out


def write_cache(data: PreparedData, folder: Path) -> None:
    """Write ``data`` to ``folder`` atomically (a temporary sibling renamed into place)."""
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {
        "train": _save_examples(data.train, tmp, "train"),
        "eval": _save_examples(data.eval, tmp, "eval"),
        "prompts": [asdict(p) for p in data.prompts],
        "dropped": dict(data.dropped),
        "truncated": dict(data.truncated),
        "split": dict(data.split),
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:  # another node published the same entry first: identical content, keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def read_cache(folder: Path) -> PreparedData:
    meta = json.loads((folder / "meta.json").read_text())
    return PreparedData(
        train=_load_examples(folder, "train", meta["train"]),
        eval=_load_examples(folder, "eval", meta["eval"]),
        prompts=[GenerationPrompt(**p) for p in meta["prompts"]],
        dropped=Counter(meta["dropped"]),
        truncated=Counter(meta["truncated"]),
        split=Counter(meta.get("split", {})),
    )


def _claim(lock: Path, token: str) -> bool:
    """True if this process is to tokenise: it created the lock, or took over one left by another job."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            holder = lock.read_text()
        except FileNotFoundError:  # released just now: the entry is (being) published
            return False
        if holder == token:
            return False  # another node of this job is tokenising
        tmp = lock.with_name(f"{lock.name}.{os.getpid()}")
        tmp.write_text(token)
        os.replace(tmp, lock)
        log.warning("took over %s, left by another job (holder %s)", lock, holder)
        return True
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return True


def load_or_prepare(
    cfg: DataConfig,
    renderer: ChatRenderer,
    seed: int,
    num_prompts: int,
    *,
    is_local_main: bool,
    barrier: Callable[[], None],
    job_token: str = "",
) -> PreparedData:
    """Prepared data from the cache, or prepared (by one local main rank) and cached for everyone.

    Every rank must call this (it contains one barrier). With ``data.cache_dir`` empty, every rank prepares
    the data itself and nothing is written.

    Args:
        job_token: The same string on every rank of this job and on no other job (rank 0 broadcasts one): a
            node that finds the lock holding it waits instead of tokenising the same data again.
    """
    if not cfg.cache_dir:
        return prepare_data(cfg, renderer, seed, num_prompts)
    folder = Path(cfg.cache_dir).expanduser() / cache_key(cfg, renderer, seed, num_prompts)
    failure = folder.with_name(f"{folder.name}.error")
    error = None
    lock = folder.with_name(f"{folder.name}.lock")
    if is_local_main and not (folder / "meta.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not _claim(lock, job_token or f"pid{os.getpid()}"):
            log.info("another node of this job is tokenising %s into %s; waiting for it", cfg.path, folder)
        elif (folder / "meta.json").is_file():  # published between the first look and the claim
            lock.unlink(missing_ok=True)
        else:
            log.info("tokenising %s (cache miss; writing %s)", cfg.path, folder)
            failure.unlink(missing_ok=True)
            try:
                write_cache(prepare_data(cfg, renderer, seed, num_prompts), folder)
            except DataError as e:  # tell the waiting ranks instead of leaving them at the barrier
                failure.write_text(str(e))
                error = e
            finally:
                lock.unlink(missing_ok=True)
    elif is_local_main:
        log.info("tokenised data from cache %s", folder)
    # Other ranks wait here while the local main rank tokenises (a long step on big data: the process group's
    # timeout must allow it).
    barrier()
    if error is not None:
        raise error
    if not (folder / "meta.json").is_file():
        raise DataError(failure.read_text() if failure.is_file() else f"tokenised data missing from {folder}")
    return read_cache(folder)
