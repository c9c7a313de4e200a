"""Prepare once: token stores on disk, keyed by the data files, the tokenizer and the data config.

Each node's local rank 0 prepares the store if it is missing and publishes it with an atomic rename; the other
ranks wait at a barrier and open it. On a filesystem shared by the nodes, a lock file holding the job's token
(agreed by all ranks) lets one node prepare while the others' local rank 0 wait with everyone else; a lock left
by another (dead) job is taken over. ``launch/prepare.py`` writes the same store ahead of training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional

from dtrain import __version__
from dtrain.config.schema import DataConfig
from dtrain.data.chat import ChatRenderer
from dtrain.data.dataset import PreparedData, open_store, prepare_data, prepare_store
from dtrain.data.mixture import data_sources
from dtrain.data.sources import DATA_SUFFIXES
from dtrain.data.store import META, damaged_message, read_meta, store_problems
from dtrain.disk import format_bytes, free_bytes, writing
from dtrain.errors import DataError, DiskFull
from dtrain.locks import LockFile, dead_because, read_holder

log = logging.getLogger("dtrain")


def _file_identity(path: str) -> list:
    """Path, size and mtime of every data file behind ``path`` (a hub id is keyed by its name)."""
    p = Path(path).expanduser()
    if not p.exists():
        return [[str(p.absolute())]]
    files = sorted(f for f in p.iterdir() if f.suffix in DATA_SUFFIXES) if p.is_dir() else [p]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


# Their bytes key the store: a change to any of them prepares the data again.
PIPELINE_SOURCES = ("sources.py", "formats.py", "turns.py", "conversation.py", "chat.py", "template_text.py", "pieces.py", "mixture.py")
PIPELINE_SOURCES += ("dataset.py", "store.py")

# The data settings that change what is prepared (weights, packing and batching do not: they reuse the store).
PREPARATION_FIELDS = ("format", "eval_path", "eval_fraction", "split", "max_seq_len", "train_on", "truncation", "on_invalid")
PREPARATION_FIELDS += ("max_invalid_fraction", "chat_template", "end_of_turn_token")
PREPARATION_FIELDS += ("messages_field", "role_key", "content_key", "roles", "chat_template_kwargs")


PROMPTS_KEPT = 64
"""Held-out generation prompts a store keeps, so that runs asking for up to this many share one store."""


def store_identity(cfg: DataConfig, renderer: ChatRenderer, seed: int, num_prompts: int) -> dict[str, Any]:
    """Everything that changes the prepared store, the data pipeline's own code included (JSON-able)."""
    tok = renderer.tokenizer
    here = Path(__file__).parent
    sources = [
        {"path": s.path, "name": s.name, "format": s.format.value, "split": s.split, "train_on": getattr(s.train_on, "value", None)}
        | {"chat_template": s.chat_template, "max_examples": s.max_examples, "files": _file_identity(s.path)}
        | {"mapping": asdict(s.mapping), "chat_template_kwargs": s.template_kwargs}
        for s in data_sources(cfg)
    ]
    settings = {f: getattr(cfg, f) for f in PREPARATION_FIELDS}
    return {
        "dtrain": __version__,
        "code": hashlib.sha256(b"".join((here / name).read_bytes() for name in PIPELINE_SOURCES)).hexdigest(),
        "data": json.loads(json.dumps(settings, default=lambda v: getattr(v, "value", str(v)))),
        "sources": sources,
        "eval_files": _file_identity(cfg.eval_path) if cfg.eval_path else None,
        "tokenizer": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
        if hasattr(tok, "backend_tokenizer")
        else tok.name_or_path,
        "chat_template": tok.chat_template,
        "special_tokens": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, renderer.end_of_turn_id],
        "seed": seed,
        "prompts_kept": max(num_prompts, PROMPTS_KEPT),
    }


def cache_key(cfg: DataConfig, renderer: ChatRenderer, seed: int, num_prompts: int) -> str:
    """The store's folder name under ``data.cache_dir``: a hash of ``store_identity``."""
    return _hash(store_identity(cfg, renderer, seed, num_prompts))


def _hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def store_folder(cfg: DataConfig, renderer: ChatRenderer, seed: int, num_prompts: int) -> Optional[Path]:
    """Where the store of this config lives: ``data.prepared_path``, else under ``data.cache_dir``; None: nowhere."""
    if cfg.prepared_path:
        return Path(cfg.prepared_path).expanduser().resolve()
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser() / cache_key(cfg, renderer, seed, num_prompts)
    return None


def check_identity(folder: Path, identity: dict) -> None:
    """Refuse a store prepared from other data, settings, tokenizer or code than ``identity``.

    Raw data files that are not on this machine are compared by path only: a store prepared elsewhere (e.g. on a
    CPU node with the corpus) trains where only the store was copied.

    Raises:
        DataError: naming the store and what differs.
    """
    stored = read_meta(folder).get("identity") or {}
    stored = _forget_absent_files(stored, identity)
    if _hash(stored) == _hash(identity):
        return
    differ = sorted(k for k in set(stored) | set(identity) if _hash({"v": stored.get(k)}) != _hash({"v": identity.get(k)}))
    raise DataError(
        f"{folder}: this token store was prepared from other settings (they differ in: {', '.join(differ)}); "
        "prepare it again with launch/prepare.py and these settings, or point data.prepared_path elsewhere"
    )


def _forget_absent_files(stored: dict, current: dict) -> dict:
    """``stored`` with the size and mtime of every file that ``current`` found absent (an entry of its path only)."""

    def strip(stored_files, current_files):
        absent = isinstance(current_files, list) and len(current_files) == 1 and len(current_files[0]) == 1
        if absent and isinstance(stored_files, list) and all(f[0].startswith(current_files[0][0]) for f in stored_files):
            return current_files
        return stored_files

    out = dict(stored)
    if isinstance(stored.get("sources"), list) and len(stored["sources"]) == len(current.get("sources") or []):
        out["sources"] = [s | {"files": strip(s.get("files"), c.get("files"))} for s, c in zip(stored["sources"], current["sources"])]
    out["eval_files"] = strip(stored.get("eval_files"), current.get("eval_files"))
    return out


def raw_bytes(cfg: DataConfig) -> int:
    """Bytes of the raw data files behind ``cfg`` (0 for what is not on this machine, e.g. a hub id)."""
    files = [f for s in data_sources(cfg) for f in _file_identity(s.path)]
    files += _file_identity(cfg.eval_path) if cfg.eval_path else []
    return sum(f[1] for f in files if len(f) > 1)


# A store takes about this many bytes per byte of JSON (int32 ids + a mask byte per token, ~4 characters a token).
STORE_BYTES_PER_RAW_BYTE = 1.5


def write_store(cfg: DataConfig, renderer: ChatRenderer, seed: int, num_prompts: int, folder: Path, progress: bool = False) -> dict:
    """Prepare the store into a temporary sibling of ``folder`` and rename it into place (atomic: a store that is
    there is complete). Returns its ``meta.json`` content.

    Raises:
        DiskFull: The filesystem filled up (or a quota was reached) while writing; nothing is left behind.
    """
    identity = store_identity(cfg, renderer, seed, num_prompts)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    estimate = int(STORE_BYTES_PER_RAW_BYTE * raw_bytes(cfg))
    free = free_bytes(folder.parent)
    if free < estimate:
        log.warning("preparing %s may not fit: about %s needed, %s free", folder, format_bytes(estimate), format_bytes(free))
    try:
        with writing(tmp, "the token store", estimate or None):
            meta = prepare_store(cfg, renderer, seed, max(num_prompts, PROMPTS_KEPT), tmp, progress=progress, identity=identity)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another node published the same store first: identical content, keep theirs
            meta = read_meta(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def claim_store(folder: Path, token: str, poll_s: float = 1.0) -> Optional[LockFile]:
    """The store's lock if this process is to prepare ``folder``; None when it need not (it is there now, or
    another node of this job, holding ``token``, prepares it: wait at the job's barrier).

    A live process of another job preparing it is waited for (its store is read once published, never half
    written); a lock whose holder died is taken over with a warning.
    """
    lock = LockFile(folder.with_name(f"{folder.name}.lock"), f"token store {folder}", token=token)
    waiting = False
    while not (folder / META).is_file():
        if lock.try_create():
            if (folder / META).is_file():  # published between the first look and the claim
                lock.release()
                return None
            return lock
        holder = read_holder(lock.path)
        if holder is None:  # released just now: look again
            continue
        if holder.token == token:
            return None  # another node of this job is preparing it
        reason = dead_because(holder)
        if reason is not None:
            if lock.take_over(holder, reason):
                return lock
            continue
        if not waiting:
            log.info("another job is preparing %s (%s); waiting for it", folder, holder.describe())
            waiting = True
        time.sleep(poll_s)
    return None


def _raw_data_present(cfg: DataConfig) -> bool:
    paths = [s.path for s in data_sources(cfg)] + ([cfg.eval_path] if cfg.eval_path else [])
    return all(Path(p).expanduser().exists() for p in paths)


def check_store(folder: Path, cfg: DataConfig, checksums: bool) -> Optional[str]:
    """Why the store in ``folder`` cannot be read (None: it can). A damaged ``data.cache_dir`` entry whose raw data
    is here is moved aside, to be prepared again (logged), and reads as missing."""
    problems = store_problems(folder, checksums)
    if not problems:
        if checksums:
            log.info("token store %s verified: every file has the size and checksum meta.json records", folder)
        return None
    if cfg.prepared_path or not _raw_data_present(cfg):
        return damaged_message(folder, problems)
    log.warning("the token store %s is damaged (%s): preparing it again from the raw data", folder, "; ".join(problems))
    try:
        os.rename(folder, folder.with_name(f"{folder.name}.damaged{os.getpid()}"))
    except OSError:  # another node moved it first
        pass
    shutil.rmtree(folder.with_name(f"{folder.name}.damaged{os.getpid()}"), ignore_errors=True)
    return None


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
    """The prepared data, memory-mapped from its store; prepared first (by one local main rank) when missing.

    Every rank must call this (it contains one barrier). With neither ``data.prepared_path`` nor
    ``data.cache_dir`` set, every rank prepares the data into a temporary store of its own. A store found is
    checked first (file sizes; checksums with ``data.verify_store``).

    Args:
        job_token: The same string on every rank of this job and on no other job (rank 0 broadcasts one): a
            node that finds the lock holding it waits instead of preparing the same data again.

    Raises:
        DataError: Bad data (named by file and line), a ``data.prepared_path`` prepared from other settings, or a
            damaged store that cannot be rebuilt here.
        DiskFull: The store did not fit.
    """
    folder = store_folder(cfg, renderer, seed, num_prompts)
    if folder is None:
        # Every rank prepares its own copy at once: one process each, or the ranks of a node would share its cores
        # among ranks x cores workers.
        data = prepare_data(replace(cfg, num_proc=cfg.num_proc or 1), renderer, seed, num_prompts)
        log_formats(data)
        return data
    token = job_token or f"pid{os.getpid()}"
    failure = folder.with_name(f"{folder.name}.error")
    error = None
    if is_local_main:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _forget_failure_of(failure, token)
        try:
            problem = check_store(folder, cfg, cfg.verify_store) if (folder / META).is_file() else None
            if problem:
                raise DataError(problem)
            if (folder / META).is_file():
                log.info("token store %s (prepared before)", folder)
            else:
                _prepare_once(cfg, renderer, seed, num_prompts, folder, token, failure)
        except (DataError, DiskFull) as e:  # tell the waiting ranks instead of leaving them at the barrier
            failure.write_text(json.dumps({"token": token, "kind": type(e).__name__, "message": str(e)}))
            error = e
            error.every_rank = True  # the others read the same message from the failure file
    # Other ranks wait here while the local main rank prepares (a long step on big data: the process group's
    # timeout must allow it).
    barrier()
    if error is not None:
        raise error
    _raise_failure_of(failure, token, must_exist=not (folder / META).is_file())
    check_identity(folder, store_identity(cfg, renderer, seed, num_prompts))
    data = open_store(folder)
    data.prompts = data.prompts[:num_prompts]
    log_formats(data)
    return data


def log_formats(data: PreparedData) -> None:
    """The start-up log's line of each source's record format (``(detected)`` where ``data.format=auto`` found it)."""
    if data.formats:
        log.info("record formats: %s", ", ".join(f"{name}: {fmt}" for name, fmt in data.formats.items()))


def _prepare_once(cfg: DataConfig, renderer: ChatRenderer, seed: int, num_prompts: int, folder: Path, token: str, failure: Path) -> None:
    lock = claim_store(folder, token)
    if lock is None:
        if not (folder / META).is_file():
            log.info("another node of this job is preparing %s; waiting for it", folder)
        return
    try:
        log.info("preparing the token store %s (not there yet)", folder)
        failure.unlink(missing_ok=True)
        meta = write_store(cfg, renderer, seed, num_prompts, folder, progress=True)
        done = meta["prepare"]
        log.info("prepared %d records in %.1f s (%d tokens/s, %d processes)", meta["records"], *done.values())
    finally:
        lock.release()


def _forget_failure_of(failure: Path, token: str) -> None:
    """Remove what an earlier call with this token left (another job's failure is that job's to read)."""
    try:
        if json.loads(failure.read_text()).get("token") == token:
            failure.unlink(missing_ok=True)
    except (OSError, ValueError, AttributeError):
        pass


def _raise_failure_of(failure: Path, token: str, must_exist: bool) -> None:
    """Raise what the preparing rank of this job left in ``failure`` (a missing store without one: DataError)."""
    try:
        left = json.loads(failure.read_text()) if failure.is_file() else None
    except ValueError:  # written by an older version: its text is the message
        left = {"token": token, "kind": "DataError", "message": failure.read_text()}
    if left is not None and left.get("token") == token:
        raise (DiskFull if left.get("kind") == "DiskFull" else DataError)(left["message"], every_rank=True)
    if must_exist:
        raise DataError(left["message"] if left else f"prepared data missing from {folder_of(failure)}")


def folder_of(failure: Path) -> Path:
    return failure.with_name(failure.name.removesuffix(".error"))
