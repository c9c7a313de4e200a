"""The SFT loop on the DeepSpeed engine: setup, train, train_step, evaluate, save, generate, close.

Run through ``launch/train.py`` (``deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu``). Every rank runs this
code; collectives (token counts, eval sums, ZeRO-3 gathers, generation under ZeRO-3) are reached by all ranks in
the same order, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dtrain.config.schema import JobConfig, ModelInit, PeftMethod
from dtrain.data import ChatRenderer, StepSampler, collate, resolve_chat_template
from dtrain.data.audit import audit_masks
from dtrain.data.cache import load_or_prepare
from dtrain.data.chat import IGNORE_INDEX, TokenizedExample
from dtrain.data.packing import collate_packed, pack_examples
from dtrain.data.sources import DataError
from dtrain.dist import all_reduce_sum, barrier, init_distributed, setup_logging
from dtrain.ds_config import BatchPlan, ConfigError, build_ds_config, write_ds_config
from dtrain.export import save_model
from dtrain.generation import exact_match_accuracy, format_samples, generate_answers
from dtrain.loss import count_trained_tokens, shifted_token_loss_sum
from dtrain.metrics import MetricsLogger
from dtrain.model import build_model, count_parameters_from_config, load_tokenizer
from dtrain.optim import build_scheduler, parameter_groups

log = logging.getLogger("dtrain")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_job(job: JobConfig) -> None:
    """Cross-field checks that types alone cannot express; raised before any model is loaded."""
    if job.train.max_steps is not None and job.train.max_steps < 1:
        raise ConfigError(f"train.max_steps={job.train.max_steps}: must be >= 1 (or null to use train.epochs)")
    if job.train.max_steps is None and job.train.epochs < 1:
        raise ConfigError(f"train.epochs={job.train.epochs}: must be >= 1")
    if job.peft.method == PeftMethod.lora and job.model.init == ModelInit.random:
        raise ConfigError(
            "peft=lora with model.init=random would train adapters on random weights that are saved nowhere, so the "
            "adapter could never be reloaded; point model.path at real weights (model.init=pretrained)"
        )


class Trainer:
    """One fine-tuning job. Construct it on every rank, then ``train()`` and ``close()``."""

    def __init__(self, job: JobConfig, resolved_yaml: str):
        self.job = job
        check_job(job)
        self.dist = init_distributed(job.train.dist_timeout_minutes)
        self.run_dir = Path(job.output_dir).resolve()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()  # the run directory exists before any rank opens a file in it
        setup_logging(self.dist, self.run_dir / "train.log")
        seed_everything(job.train.seed)

        # Data first: a bad file or template fails here, before minutes of model loading.
        self.tokenizer = load_tokenizer(job.model)
        resolve_chat_template(self.tokenizer, job.data.chat_template)
        self.renderer = ChatRenderer(self.tokenizer, job.data.train_on, job.data.end_of_turn_token)
        self.data = load_or_prepare(job.data, self.renderer, job.train.seed, job.generate.num_prompts,
                                    is_local_main=self.dist.local_rank == 0, barrier=barrier)
        checked = audit_masks(self.data.train, self.renderer, job.train.seed)
        log.info("mask audit: %d examples checked (trained tokens, end-of-turn tokens, labels)", checked)
        self.pad_id = self.tokenizer.pad_token_id

        self.batch = BatchPlan.from_config(job.train, self.dist.world_size)
        self.train_units = self._make_units()
        lengths = [sum(len(e.input_ids) for e in unit) for unit in self.train_units]
        grouped = job.data.group_by_length and not job.data.packing
        self.sampler = StepSampler(len(self.train_units), self.batch, self.dist.rank, job.train.seed, lengths if grouped else None)
        if self.sampler.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(self.train_units)} training {self._unit_name} do not fill one global batch of {self.batch.global_batch_size} "
                "(micro_batch_size x grad_accum_steps x world size); lower the batch size or add data"
            )
        self.total_steps = job.train.max_steps or job.train.epochs * self.sampler.steps_per_epoch

        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(job.model.path, trust_remote_code=job.model.trust_remote_code, revision=job.model.revision)
        self._check_vocab(model_config.vocab_size)
        self.ds_config = build_ds_config(
            job,
            self.batch,
            hidden_size=getattr(model_config, "hidden_size", None),
            num_parameters=count_parameters_from_config(model_config),
            cuda_available=torch.cuda.is_available(),
        )
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(resolved_yaml)
            write_ds_config(self.ds_config, self.run_dir / "ds_config.json")
        self._log_plan()

        import deepspeed

        model, self._hf_ds_config = build_model(job, self.ds_config)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=parameter_groups(model, job.train.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, job.train, self.total_steps),
        )
        self.metrics = MetricsLogger(self.run_dir, self.dist.is_main, job.wandb, _plain(job), job.run_name)
        self.step = 0
        self.skipped_steps = 0
        self.real_tokens = self.token_slots = 0

    # ------------------------------------------------------------------ setup helpers

    @property
    def _unit_name(self) -> str:
        return "packed rows" if self.job.data.packing else "examples"

    def _make_units(self) -> list[list[TokenizedExample]]:
        """What the sampler draws: packed rows of examples, or single examples."""
        train = self.data.train
        if not self.job.data.packing:
            return [[e] for e in train]
        rows = pack_examples([len(e.input_ids) for e in train], self.job.data.max_seq_len, self.job.train.seed)
        return [[train[i] for i in row] for row in rows]

    def _collate(self, units: list[list[TokenizedExample]]) -> dict[str, torch.Tensor]:
        if self.job.data.packing:
            return collate_packed(units, self.pad_id)
        return collate([unit[0] for unit in units], self.pad_id)

    def _planned_padding_efficiency(self) -> float:
        """Real tokens / token slots over epoch 0's micro-batches on all ranks (lengths only, no tensors)."""
        real = slots = 0
        for rank in range(self.dist.world_size):
            sampler = StepSampler(self.sampler.num_examples, self.batch, rank, self.sampler.seed, self.sampler.lengths)
            for step in sampler.steps(0):
                for idx in step:
                    sizes = [sum(len(e.input_ids) for e in self.train_units[i]) for i in idx]
                    real += sum(sizes)
                    slots += max(sizes) * len(sizes)
        return real / max(slots, 1)

    def _check_vocab(self, vocab_size: int) -> None:
        biggest = max(max(e.input_ids) for e in self.data.train + self.data.eval)
        if biggest >= vocab_size:
            raise DataError(
                f"token id {biggest} does not fit the model's {vocab_size} embedding rows: the tokenizer at "
                f"{self.job.model.path} does not belong to this model (or added tokens need resize_token_embeddings)"
            )

    def _log_plan(self) -> None:
        b, d = self.batch, self.data
        trained = sum(e.num_trained for e in d.train)
        total = sum(len(e.input_ids) for e in d.train)
        log.info(
            "batch: %d micro x %d accumulation x %d ranks = %d %s per optimizer step",
            b.micro_batch_size, b.grad_accum_steps, b.world_size, b.global_batch_size, self._unit_name,
        )
        log.info(
            "data: %d train / %d eval examples, %d tokens of which %d trained (%.1f%%); %d steps/epoch, %d total steps",
            len(d.train), len(d.eval), total, trained, 100.0 * trained / max(total, 1), self.sampler.steps_per_epoch, self.total_steps,
        )
        for reason, count in sorted(d.dropped.items()):
            log.warning("dropped %d example(s): %s", count, reason)
        for reason, count in sorted(d.truncated.items()):
            log.warning("%d example(s) %s", count, reason)
        if self.job.data.packing:
            log.info("packing: %d examples into %d rows of <= %d tokens", len(d.train), len(self.train_units), self.job.data.max_seq_len)
        layout = "packed" if self.job.data.packing else ("padded, grouped by length" if self.sampler.lengths else "padded")
        log.info("padding efficiency (real tokens / token slots) planned for epoch 0: %.1f%% (%s)", 100 * self._planned_padding_efficiency(), layout)
        if self.sampler.unused_per_epoch:
            log.info("%d %s per epoch do not fill a global batch; each epoch's shuffle leaves out different ones",
                     self.sampler.unused_per_epoch, self._unit_name)

    # ------------------------------------------------------------------ training

    def train(self) -> dict:
        """Run all optimizer steps, evaluate, save ``final/`` and run the generation check."""
        job = self.job
        before = self.generate_samples("samples_before.jsonl") if job.generate.before_training else None
        progress = _progress(self.total_steps, self.dist.is_main)
        epoch = 0
        while self.step < self.total_steps:
            for micro_indices in self.sampler.steps(epoch):
                record = self.train_step(micro_indices)
                self.step += 1
                if record is not None:
                    record.update(step=self.step, epoch=epoch)
                    self.metrics.log(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    if self.step % job.train.log_every == 0 or self.step == 1:
                        log.info("step %d/%d loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f", self.step, self.total_steps,
                                 record["loss"], record["lr"], record["grad_norm"], record["tokens_per_s"])
                progress.update(1)
                if job.train.eval_every and self.step % job.train.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()
                if self.step >= self.total_steps:
                    break
            epoch += 1
        progress.close()
        eval_loss = self.evaluate()
        self.save()
        after = self.generate_samples("samples.jsonl")
        return self._summarise(eval_loss, before, after)

    def train_step(self, micro_indices: list[list[int]]) -> Optional[dict]:
        """One optimizer step over this rank's micro-batches, with the loss normalised by the global token count.

        The loss of the step is (sum of token cross-entropies over every trained token of every micro-batch on
        every rank) / (number of those tokens), so it does not depend on micro-batch size or world size.
        """
        t0 = time.perf_counter()
        batches = [self._collate([self.train_units[i] for i in idx]) for idx in micro_indices]
        local_tokens = sum(count_trained_tokens(b["labels"]) for b in batches)
        local_real = sum(len(e.input_ids) for idx in micro_indices for i in idx for e in self.train_units[i])
        local_slots = sum(b["input_ids"].numel() for b in batches)
        # Sync point: the normaliser must be known on every rank before the first backward of the step.
        global_tokens, global_real, global_slots = all_reduce_sum([local_tokens, local_real, local_slots], self.dist.device)
        self.real_tokens += global_real
        self.token_slots += global_slots
        if global_tokens == 0:
            self.skipped_steps += 1
            log.warning("step %d: no trained token in the global batch; step skipped", self.step + 1)
            return None
        # DeepSpeed divides the loss by the accumulation steps and averages gradients over ranks; scaling by
        # both makes the final gradient exactly d(global token-mean loss).
        scale = self.batch.grad_accum_steps * self.batch.world_size / global_tokens
        local_loss_sum = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        for batch in batches:
            loss_sum = shifted_token_loss_sum(self._forward(batch), batch["labels"].to(self.dist.device))
            self.engine.backward(loss_sum * scale)
            self.engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
            local_loss_sum += loss_sum.detach().double()
        (global_loss_sum,) = all_reduce_sum([local_loss_sum.item()], self.dist.device)
        elapsed = time.perf_counter() - t0
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": global_loss_sum / global_tokens,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens": int(global_tokens),
            "tokens_per_s": global_tokens / elapsed,
            "input_tokens": int(global_real),
            "padding_efficiency": global_real / global_slots,
            "step_time_s": elapsed,
        }

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the engine on one collated batch (a collective under ZeRO-3: parameters are gathered)."""
        # use_cache=False matters beyond memory: with a cache, transformers ignores packed position_ids and
        # packed examples would attend to each other.
        inputs = {k: v.to(self.dist.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        return self.engine(**inputs, use_cache=False).logits

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Token-mean loss over the whole eval split, summed across ranks. Logged as ``eval_loss``."""
        examples = self.data.eval
        if not examples:
            return None
        world, rank, micro = self.dist.world_size, self.dist.rank, self.batch.micro_batch_size
        shard = examples[rank::world]
        # Same number of forwards on every rank (ZeRO-3 gathers parameters collectively in each forward);
        # a rank with fewer examples runs a fully masked filler batch that adds nothing to the sums.
        num_batches = math.ceil(math.ceil(len(examples) / world) / micro)
        filler = TokenizedExample("<filler>", examples[0].input_ids, [IGNORE_INDEX] * len(examples[0].input_ids))
        self.engine.eval()
        loss_sum, tokens = 0.0, 0
        for k in range(num_batches):
            chunk = shard[k * micro : (k + 1) * micro] or [filler]
            batch = collate(chunk, self.pad_id)
            loss_sum += float(shifted_token_loss_sum(self._forward(batch), batch["labels"].to(self.dist.device)))
            tokens += count_trained_tokens(batch["labels"])
        self.engine.train()
        total_loss, total_tokens = all_reduce_sum([loss_sum, tokens], self.dist.device)
        eval_loss = total_loss / max(total_tokens, 1)
        self.metrics.log({"step": self.step, "eval_loss": eval_loss, "eval_tokens": int(total_tokens)})
        log.info("step %d eval_loss %.4f (%d tokens)", self.step, eval_loss, total_tokens)
        return eval_loss

    # ------------------------------------------------------------------ outputs

    def save(self) -> Path:
        """Write ``final/`` (all ranks take part in the ZeRO-3 gather) and the engine's logits on one batch."""
        final = self.run_dir / "final"
        save_model(self.engine.module, self.tokenizer, final, self.dist, self.job.peft.method == PeftMethod.lora)
        self._write_probe()
        return final

    @torch.no_grad()
    def _write_probe(self) -> None:
        """Store one batch and the engine's logits on it, so the export can be checked against the engine."""
        from safetensors.torch import save_file

        examples = (self.data.eval or self.data.train)[: self.batch.micro_batch_size]
        batch = collate(examples, self.pad_id)
        self.engine.eval()
        logits = self._forward(batch)
        self.engine.train()
        if self.dist.is_main:
            tensors = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits": logits.float().cpu()}
            save_file(tensors, str(self.run_dir / "probe.safetensors"))

    def generate_samples(self, filename: str) -> list[dict]:
        """Greedy answers to the held-out prompts, written to ``filename`` in the run directory."""
        if not self.data.prompts:
            return []
        results = generate_answers(
            self.engine.module,
            self.renderer,
            self.data.prompts,
            device=self.dist.device,
            max_new_tokens=self.job.generate.max_new_tokens,
            synced_gpus=self.job.zero.stage == 3 and self.dist.world_size > 1,
        )
        if self.dist.is_main:
            with (self.run_dir / filename).open("w") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
        log.info("%s: exact match %.1f%% on %d held-out prompts", filename, 100 * exact_match_accuracy(results), len(results))
        return results

    def _summarise(self, eval_loss: Optional[float], before: Optional[list[dict]], after: list[dict]) -> dict:
        summary = {
            "run_dir": str(self.run_dir),
            "final_dir": str(self.run_dir / "final"),
            "steps": self.step,
            "skipped_steps": self.skipped_steps,
            "padding_efficiency": self.real_tokens / max(self.token_slots, 1),
            "eval_loss": eval_loss,
            "accuracy_before": exact_match_accuracy(before) if before is not None else None,
            "accuracy_after": exact_match_accuracy(after) if after else None,
            "num_prompts": len(after),
        }
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.metrics.summary(summary)
        if after:
            log.info("generation check (%s/samples.jsonl):\n%s", self.run_dir, format_samples(after))
        if before is not None:
            log.info("exact match on %d held-out prompts: %.1f%% before training -> %.1f%% after",
                     len(after), 100 * summary["accuracy_before"], 100 * (summary["accuracy_after"] or 0.0))
        return summary

    def close(self) -> None:
        self.metrics.close()
        barrier()
        import torch.distributed as torch_dist

        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _plain(job: JobConfig) -> dict:
    """The job as plain JSON-able values (enums as strings), for W&B's run config."""
    return json.loads(json.dumps(asdict(job), default=lambda v: getattr(v, "value", str(v))))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc="train", dynamic_ncols=True, mininterval=2.0)
