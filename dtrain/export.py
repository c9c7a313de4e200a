"""Writing the trained model as plain Hugging Face / peft folders, and checking what was written.

Full fine-tuning: sharded safetensors (HF names and index), gathered from ZeRO-3 partitions one parameter at a
time, so rank 0 holds at most one shard of the full model. LoRA: the adapter only. Both: the tokenizer with its
chat template. After writing, rank 0 re-reads the folder: every tensor present with its shape, and (when asked)
the reloaded model's logits equal the engine's on a probe batch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from dtrain import faults
from dtrain.disk import failed_path, free_bytes, is_no_space, no_space_error, publish_folder
from dtrain.dist import DistInfo, broadcast_object
from dtrain.errors import ConfigError, DiskFull, ExportError

log = logging.getLogger("dtrain")

PARTIAL_SUFFIX = ".partial"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LOGITS_CHECK_MAX_PARAMS = 3_000_000_000
"""``export.verify=auto`` reloads the model on CPU for the logits check only up to this size."""


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"1024"`` -> bytes (decimal units, as ``transformers`` uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", text.upper())
    if not m:
        raise ConfigError(f"export.max_shard_size={text!r}: expected a size such as 5GB or 500MB")
    unit = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[m.group(2)]
    return int(float(m.group(1)) * unit)


def iter_full_parameters(model, dist: DistInfo, trainable_only: bool) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """Yield ``(name, full tensor on CPU)`` for each parameter (and persistent buffer); the tensor is None off rank 0.

    Collective under ZeRO-3: every rank must drain the iterator. One parameter is gathered at a time, so no rank
    holds more than one full parameter beyond its own partition.
    """
    import deepspeed

    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # partitioned by ZeRO-3: gather, copy on rank 0, re-partition
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.detach().cpu().clone() if dist.is_main else None
        else:
            yield name, param.detach().cpu().clone() if dist.is_main else None
    if not trainable_only:
        persistent = model.state_dict().keys()
        for name, buf in model.named_buffers():
            if name in persistent:
                yield name, buf.detach().cpu().clone() if dist.is_main else None


def gather_parameters(model, dist: DistInfo, trainable_only: bool) -> dict[str, torch.Tensor]:
    """All of :func:`iter_full_parameters` in one dict on rank 0 (empty elsewhere); for small (adapter) states."""
    return {name: t for name, t in iter_full_parameters(model, dist, trainable_only) if t is not None}


def write_sharded_safetensors(
    tensors: Iterator[tuple[str, Optional[torch.Tensor]]], out_dir: Path, max_shard_bytes: int, is_main: bool
) -> dict[str, tuple[int, ...]]:
    """Write tensors into HF-named safetensors shards of at most ``max_shard_bytes`` (a bigger tensor gets its own).

    Drains ``tensors`` on every rank (it may be a collective); only rank 0 writes. Returns name -> shape.

    Raises:
        DiskFull: (rank 0, after draining ``tensors``, so no rank is left in a gather) a shard did not fit; the
            shards written so far are removed.
    """
    from safetensors.torch import save_file

    shapes: dict[str, tuple[int, ...]] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, written, weight_map, total = 0, [], {}, 0
    failed: Optional[BaseException] = None

    def flush() -> None:
        nonlocal shard, shard_bytes, failed
        if shard and failed is None:
            tmp = out_dir / f"shard-{len(written):05d}.tmp"
            written.append((tmp, list(shard)))
            try:
                save_file(shard, str(tmp), metadata={"format": "pt"})
                faults.no_space("export", len(written), None, tmp, tmp.read_bytes())
            except Exception as e:
                if not is_no_space(e):
                    raise
                failed = e
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        if not is_main or tensor is None:
            continue
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        if failed is None:
            shard[name] = tensor.contiguous()
            shard_bytes += size
        total += size
        shapes[name] = tuple(tensor.shape)
    if not is_main:
        return shapes
    flush()
    if failed is not None:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise no_space_error(getattr(failed, "filename", None) or out_dir, "the exported model", total) from failed
    for old in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob(SAFE_INDEX)):
        old.unlink()  # shards of an earlier export with another shard count must not linger
    if len(written) == 1:
        os.replace(written[0][0], out_dir / SAFE_WEIGHTS)
        return shapes
    for i, (tmp, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, out_dir / final)
        weight_map.update({n: final for n in names})
    (out_dir / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return shapes


def save_model(model, tokenizer, out_dir: Path, dist: DistInfo, is_peft: bool, max_shard_bytes: int) -> dict[str, tuple[int, ...]]:
    """Write ``out_dir`` so it loads with plain ``transformers`` (full) or ``peft`` (adapter) plus the tokenizer.

    Collective: every rank calls it; only rank 0 writes. The folder is written as ``<out_dir>.partial`` and renamed
    once complete, so a folder named ``out_dir`` is always a whole export. Returns the written tensors' shapes
    (rank 0).

    Raises:
        DiskFull: on every rank, when the filesystem cannot hold the export (checked before writing) or filled up
            while writing (nothing of it is left; an earlier ``out_dir`` stays as it was).
    """
    staging = out_dir.with_name(out_dir.name + PARTIAL_SUFFIX)
    problem, shapes, needed = None, {}, None
    if dist.is_main:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        needed, free = export_bytes(model, is_peft), free_bytes(staging)
        if free < needed:
            problem = str(no_space_error(out_dir, "the exported model", needed, free))
    # Sync point: every rank learns whether the export fits before the gathers start.
    problem = broadcast_object(problem)
    if problem is None:
        try:
            shapes = _write_model(model, tokenizer, staging, dist, is_peft, max_shard_bytes)
            if dist.is_main:
                publish_folder(staging, out_dir)
                log.info("saved %s to %s", "LoRA adapter + tokenizer" if is_peft else "model + tokenizer", out_dir)
        except Exception as e:  # rank 0 only: the other ranks' part (the gathers) is over
            if not (dist.is_main and (isinstance(e, DiskFull) or is_no_space(e))):
                raise
            problem = str(e if isinstance(e, DiskFull) else no_space_error(failed_path(e, out_dir), "the exported model", needed))
        if dist.is_main and problem:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
        # Sync point: nobody reads the folder (or exits) before rank 0 has finished writing it; all stop together.
        problem = broadcast_object(problem)
    if problem:
        raise DiskFull(problem, every_rank=True)
    return shapes


def export_bytes(model, trainable_only: bool) -> int:
    """The bytes of the tensors an export writes (ZeRO-3 partitioned parameters by their full size)."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)


def _write_model(model, tokenizer, out_dir: Path, dist: DistInfo, is_peft: bool, max_shard_bytes: int) -> dict[str, tuple[int, ...]]:
    if is_peft:
        state = gather_parameters(model, dist, trainable_only=True)
        shapes = {}
        if dist.is_main:
            if not state:
                raise ExportError("LoRA export gathered no trainable tensors; refusing to write an empty adapter")
            from peft import get_peft_model_state_dict

            shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, state_dict=state).items()}
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            weights = out_dir / ADAPTER_WEIGHTS
            faults.no_space("export", 1, None, weights, weights.read_bytes() if weights.is_file() else b"")
    else:
        shapes = write_sharded_safetensors(iter_full_parameters(model, dist, trainable_only=False), out_dir, max_shard_bytes, dist.is_main)
        if dist.is_main:
            model.config.use_cache = True  # for users of the exported model; training turned it off
            model.config.save_pretrained(out_dir)
            model.config.use_cache = False
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(out_dir)
    if dist.is_main:
        tokenizer.save_pretrained(out_dir)
    return shapes


# ---------------------------------------------------------------------------------------------- verification


def saved_tensor_shapes(out_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in the folder's safetensors files (headers only, no data read)."""
    from safetensors import safe_open

    files = sorted(out_dir.glob("model*.safetensors")) or sorted(out_dir.glob(ADAPTER_WEIGHTS))
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


def check_shapes(out_dir: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise unless the folder holds exactly ``expected`` (names and shapes), with no empty tensor."""
    found = saved_tensor_shapes(out_dir)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    empty = sorted(n for n, s in found.items() if 0 in s)
    if missing or extra or wrong or empty:
        raise ExportError(
            f"{out_dir} does not hold the trained tensors: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shape {wrong[:5]}, empty {empty[:5]}"
        )


def logits_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """Largest allowed |reloaded - engine| logit difference: tight in fp32, bf16/fp16 rounding otherwise."""
    if dtype == torch.float32:
        return 1e-4
    return 0.05 + 0.02 * float(reference.abs().max())


def check_logits(load: Callable[[], torch.nn.Module], probe: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """Reload with ``load()`` (on CPU), run the probe batch, compare with the engine's logits; return the max diff."""
    model = load().eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"], use_cache=False).logits.float()
    real = probe["attention_mask"].bool()
    diff = float((logits[real] - probe["logits"][real]).abs().max())
    tol = logits_tolerance(dtype, probe["logits"][real])
    if not diff <= tol:
        raise ExportError(f"the reloaded export's logits differ from the engine's by {diff:.3g} (allowed {tol:.3g})")
    return diff


def verify_export(final: Path, shapes: dict, probe: dict[str, torch.Tensor], job, num_parameters: int) -> None:
    """Re-read ``final/`` on this (main) rank as ``export.verify`` asks: shapes, then logits against the engine's.

    Raises:
        ExportError: a tensor is missing, empty or misshapen, or the reloaded logits differ.
    """
    from dtrain.config.schema import ExportVerify, PeftMethod
    from dtrain.model import TORCH_DTYPES, load_exported, quantization_config

    mode = job.export.verify
    if mode == ExportVerify.none:
        return
    check_shapes(final, shapes)
    what = f"{len(shapes)} tensors with their shapes"
    if mode == ExportVerify.logits or (mode == ExportVerify.auto and num_parameters <= LOGITS_CHECK_MAX_PARAMS):
        dtype = TORCH_DTYPES[job.precision.name]
        quant = quantization_config(job.peft, dtype) if job.peft.method == PeftMethod.qlora else None
        diff = check_logits(lambda: load_exported(final, job.model.path, job.peft.uses_adapters, dtype, quant), probe, dtype)
        what += f"; reloaded logits match the engine's (max |diff| {diff:.2e})"
    log.info("export verified: %s", what)


# ---------------------------------------------------------------------------------------------- LoRA merge


def merge_lora_run(run_dir: Path, out_dir: Path, max_shard_bytes: int) -> float:
    """Merge a LoRA run's adapter (``<run_dir>/final``) into its base model and write a plain transformers folder.

    One process, on CPU. The written folder is re-read: its tensors must match the merged model's, and its
    logits on the run's probe batch must equal base + adapter (unmerged) within the dtype's tolerance.

    Returns:
        The largest |merged - (base + adapter)| logit difference on the probe batch.
    """
    from safetensors.torch import load_file

    from dtrain.config import load_run_config
    from dtrain.config.schema import PeftMethod
    from dtrain.dist import DistInfo
    from dtrain.model import TORCH_DTYPES, load_exported, quantization_config

    job = load_run_config(run_dir)
    if not job.peft.uses_adapters:
        raise ConfigError(f"{run_dir} is a full fine-tuning run: {run_dir / 'final'} is already a complete model")
    final, dtype = Path(run_dir) / "final", TORCH_DTYPES[job.precision.name]
    if not (Path(run_dir) / "probe.safetensors").is_file():
        raise ConfigError(f"{run_dir} has no probe.safetensors: the run did not finish its export, so there is nothing to merge")
    probe = load_file(str(Path(run_dir) / "probe.safetensors"))
    quant = quantization_config(job.peft, dtype) if job.peft.method == PeftMethod.qlora else None
    peft_model = load_exported(final, job.model.path, is_peft=True, dtype=dtype, quantization=quant).eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
    if quant is not None:
        # The adapter was trained against the 4-bit base, so it is merged into that base dequantised to the
        # training dtype (NF4 rounding kept), not into the original weights.
        base = peft_model.unload().dequantize()
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base, final)
        log.info("QLoRA: merging into a %s copy of the 4-bit base, dequantised", job.precision.name.value)
    merged = peft_model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    one_process = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    shapes = write_sharded_safetensors(
        iter_full_parameters(merged, one_process, trainable_only=False), out_dir, max_shard_bytes, is_main=True
    )
    merged.config.use_cache = True
    merged.config.save_pretrained(out_dir)
    if getattr(merged, "generation_config", None) is not None:
        merged.generation_config.save_pretrained(out_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(final).save_pretrained(out_dir)
    check_shapes(out_dir, shapes)
    reference = {**probe, "logits": unmerged}
    diff = check_logits(lambda: load_exported(out_dir, None, is_peft=False, dtype=dtype), reference, dtype)
    log.info("merged model written to %s and verified (max |logit diff| vs base + adapter: %.2e)", out_dir, diff)
    return diff
