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
import uuid
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dtrain import faults
from dtrain.checkpoint import CheckpointManager, TrainerState, resume_key
from dtrain.chunked_loss import install_chunked_loss_head, liger_available
from dtrain.config.schema import JobConfig, ModelInit, OptimName, PeftMethod, Precision
from dtrain.data import ChatRenderer, StepSampler, collate, resolve_chat_template
from dtrain.data.audit import audit_masks
from dtrain.data.cache import load_or_prepare
from dtrain.data.chat import IGNORE_INDEX, TokenizedExample
from dtrain.data.packing import choose_packing, collate_packed, pack_examples
from dtrain.data.prefetch import Prefetcher
from dtrain.data.sources import DataError
from dtrain.dist import all_gather_objects, all_reduce_sum, barrier, broadcast_object, init_distributed, setup_logging
from dtrain.ds_config import BatchPlan, ConfigError, build_ds_config, write_ds_config
from dtrain.export import ExportError, parse_size, save_model, verify_export
from dtrain.generation import exact_match_accuracy, format_samples, generate_answers
from dtrain.guard import StepGuard, TrainingError
from dtrain.loss import count_trained_tokens, shifted_token_loss_sum
from dtrain.memory import (
    DTYPE_BYTES, GradientMeter, ModelShape, activation_bytes, compare_plan, engine_state_bytes, format_plans, measure_saved_bytes,
    peak_memory_bytes, plan_for_run,
)
from dtrain.metrics import MetricsLogger
from dtrain.oom import oom_report
from dtrain.report import render_report
from dtrain.throughput import PhaseTimer, mfu, peak_flops, step_flops
from dtrain.model import build_model, check_adamw_8bit, check_qlora, count_parameters_from_config, load_tokenizer, parameter_counts
from dtrain.optim import build_client_optimizer, build_scheduler, parameter_groups
from dtrain.preemption import Preempted, PreemptionFlag
from dtrain.watchdog import StepWatchdog

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
    if job.peft.uses_adapters and job.model.init == ModelInit.random:
        raise ConfigError(
            f"peft={job.peft.method.value} with model.init=random would train adapters on random weights that are saved "
            "nowhere, so the adapter could never be reloaded; point model.path at real weights (model.init=pretrained)"
        )
    if job.peft.method == PeftMethod.qlora:
        check_qlora(job)
    if job.optim.name == OptimName.adamw_8bit:
        check_adamw_8bit(job)


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
        # Before anything is (over)written: a checkpoint from other settings is refused here, not after loading.
        self.ckpt = CheckpointManager(self.run_dir, job.ckpt, self.dist, resume_key(job, self.dist.world_size),
                                      exclude_frozen=job.peft.uses_adapters)
        resume_from = self.ckpt.choose()

        # Data first: a bad file or template fails here, before minutes of model loading.
        self.tokenizer = load_tokenizer(job.model)
        resolve_chat_template(self.tokenizer, job.data.chat_template)
        self.renderer = ChatRenderer(self.tokenizer, job.data.train_on, job.data.end_of_turn_token)
        # One token per job, agreed by all ranks: on a shared filesystem one node tokenises, the others wait.
        job_token = broadcast_object(uuid.uuid4().hex if self.dist.is_main else None)
        self.data = load_or_prepare(job.data, self.renderer, job.train.seed, job.generate.num_prompts,
                                    is_local_main=self.dist.local_rank == 0, barrier=barrier, job_token=job_token)
        checked = audit_masks(self.data.train, self.renderer, job.train.seed)
        log.info("mask audit: %d examples checked (trained tokens, end-of-turn tokens, labels)", checked)
        self.pad_id = self.tokenizer.pad_token_id
        if job.data.packing is None:  # resolved once, from the data: every rank and every restart decide alike
            job.data.packing, efficiency = choose_packing([len(e.input_ids) for e in self.data.train],
                                                          job.train.micro_batch_size, job.train.seed)
            log.info("data.packing=null: padded micro-batches in shuffled order would hold %.1f%% real tokens, so %s "
                     "(set data.packing to choose)",
                     100 * efficiency, "packing on: a micro-batch is now rows of packed examples" if job.data.packing else "padding")

        self.batch = BatchPlan.from_config(job.train, self.dist.world_size)
        self.train_units = self._make_units()
        lengths = [sum(len(e.input_ids) for e in unit) for unit in self.train_units]
        self.sampler = StepSampler(len(self.train_units), self.batch, self.dist.rank, job.train.seed, lengths, job.data.group_by_length)
        if self.sampler.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(self.train_units)} training {self._unit_name} do not fill one global batch of {self.batch.global_batch_size} "
                "(micro_batch_size x grad_accum_steps x world size); lower the batch size or add data"
            )
        self.total_steps = job.train.max_steps or job.train.epochs * self.sampler.steps_per_epoch

        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(job.model.path, trust_remote_code=job.model.trust_remote_code, revision=job.model.revision)
        self._check_vocab(model_config.vocab_size)
        self.num_parameters = count_parameters_from_config(model_config)
        self.ds_config = build_ds_config(
            job,
            self.batch,
            hidden_size=getattr(model_config, "hidden_size", None),
            num_parameters=self.num_parameters,
            cuda_available=torch.cuda.is_available(),
        )
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(resolved_yaml)
            write_ds_config(self.ds_config, self.run_dir / "ds_config.json")
        self._log_plan()
        self.shape = ModelShape.from_hf_config(model_config, self.num_parameters)
        self.memory_plan = plan_for_run(job, self.shape, self.dist.world_size, self.dist.local_world_size, self.ds_config)
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        self.peak_flops = peak_flops(device_name, job.precision.name == Precision.fp32, job.train.peak_tflops)
        log.info("memory plan per %s (launch/plan.py prices the alternatives):\n%s",
                 "GPU" if torch.cuda.is_available() else "rank", format_plans([self.memory_plan]))

        import deepspeed

        model, self._hf_ds_config = build_model(job, self.ds_config, self.num_parameters)
        # Before deepspeed.initialize: ZeRO-3 hooks the modules present then, and the head must gather its weight.
        self.loss_head = install_chunked_loss_head(model, job.train.loss_chunk_size) if job.train.loss_chunk_size else None
        if self.loss_head is not None:
            log.info("loss: computed from the hidden states %d trained tokens at a time (%s); no [tokens, vocab] logits",
                     job.train.loss_chunk_size, "Liger's fused kernel" if liger_available() else "dtrain.chunked_loss")
        # Adapters skip the frozen weights' weight-gradient work: MFU counts 4 FLOPs per frozen weight, not 6.
        self.trainable_weights = parameter_counts(model)[0] if job.peft.uses_adapters else None
        groups = parameter_groups(model, job.train.weight_decay)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            optimizer=build_client_optimizer(groups, job.train, job.optim),
            config=self.ds_config,
            lr_scheduler=lambda optimizer: build_scheduler(optimizer, job.train, self.total_steps),
        )
        self.gradient_meter = GradientMeter(self.engine)
        self.started = time.monotonic()
        self.measured_activations: Optional[dict] = None
        self.resumed = resume_from is not None
        self.state = self.ckpt.restore(self.engine, resume_from) if self.resumed else TrainerState()
        self.guard = StepGuard(job.train.max_bad_steps, job.train.spike_factor, self.state.bad_steps_in_a_row, self.state.recent_losses)
        self.preemption = PreemptionFlag(self.dist.device)
        self.metrics = MetricsLogger(self.run_dir, self.dist.is_main, job.wandb, _plain(job), job.run_name,
                                     resume_step=self.state.step if self.resumed else None)
        if job.ckpt.every_steps:
            log.info("checkpoints: every %d steps into %s, keeping the last %d", job.ckpt.every_steps, self.ckpt.root, job.ckpt.keep_last)

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

    def _collate_indices(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self._collate([self.train_units[i] for i in indices])

    def _collate(self, units: list[list[TokenizedExample]]) -> dict[str, torch.Tensor]:
        if self.job.data.packing:
            return collate_packed(units, self.pad_id)
        return collate([unit[0] for unit in units], self.pad_id)

    def _planned_padding_efficiency(self) -> float:
        """Real tokens / token slots over epoch 0's micro-batches on all ranks (lengths only, no tensors)."""
        real = slots = 0
        for rank in range(self.dist.world_size):
            sampler = StepSampler(self.sampler.num_examples, self.batch, rank, self.sampler.seed, self.sampler.lengths, self.sampler.grouping)
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
        layout = f"{'packed' if self.job.data.packing else 'padded'}, group_by_length={self.sampler.grouping.value}"
        log.info("padding efficiency (real tokens / token slots) planned for epoch 0: %.1f%% (%s)", 100 * self._planned_padding_efficiency(), layout)
        if self.sampler.unused_per_epoch:
            log.info("%d %s per epoch do not fill a global batch; each epoch's shuffle leaves out different ones",
                     self.sampler.unused_per_epoch, self._unit_name)

    # ------------------------------------------------------------------ training

    def train(self) -> dict:
        """Run the remaining optimizer steps, evaluate, checkpoint, save ``final/`` and run the generation check.

        Raises:
            Preempted: a rank got SIGTERM/SIGUSR1; every rank saved a checkpoint at the same step first.
        """
        job, state = self.job, self.state
        before = self._samples_before()
        watchdog = StepWatchdog(60 * job.train.step_timeout_minutes, self.dist.rank)
        progress = _progress(self.total_steps, self.dist.is_main, initial=state.step)
        try:
            while state.step < self.total_steps:
                epoch, start = divmod(state.step, self.sampler.steps_per_epoch)
                # The next steps' batches are collated (and pinned on a GPU machine) while this step computes.
                with Prefetcher(self.sampler.steps(epoch, start), self._collate_indices,
                                pin_memory=self.dist.device.type == "cuda") as prefetched:
                    for micro_indices, batches, data_wait_s in prefetched:
                        if self.preemption.agreed():
                            self._stop_for_preemption(watchdog)
                        watchdog.beat(f"step {state.step + 1}")
                        record = self._guarded_step(micro_indices, batches, data_wait_s)
                        state.step += 1
                        if record is not None:
                            self._log_step(record, epoch, progress)
                        progress.update(1)
                        if job.train.eval_every and state.step % job.train.eval_every == 0 and state.step < self.total_steps:
                            watchdog.beat(f"eval after step {state.step}")
                            self.evaluate()
                        if job.ckpt.every_steps and state.step % job.ckpt.every_steps == 0:
                            watchdog.beat(f"checkpoint save at step {state.step}")
                            self.save_checkpoint()
                        if state.step >= self.total_steps:
                            break
            progress.close()
            watchdog.beat("final eval, checkpoint and export")
            eval_loss = self.evaluate()
            if self.ckpt.last_saved_step != state.step:
                self.save_checkpoint()
            self.save()
            watchdog.beat("generation check")
            after = self.generate_samples("samples.jsonl")
            self._report_memory()
        finally:
            watchdog.stop()
        return self._summarise(eval_loss, before, after)

    def _guarded_step(self, micro_indices: list[list[int]], batches: list[dict[str, torch.Tensor]],
                      data_wait_s: float) -> Optional[dict]:
        """``train_step``, turning the two failures that need their own message into a clear error."""
        try:
            faults.at_step_start(self.state.step + 1, self.dist.rank)
            return self.train_step(micro_indices, batches, data_wait_s)
        except torch.OutOfMemoryError as e:
            raise TrainingError(self._oom_report()) from e
        except RuntimeError as e:
            if not _is_collective_failure(e):
                raise
            raise TrainingError(
                f"rank {self.dist.rank}: a collective failed in step {self.state.step + 1} because another rank died "
                f"or lost its connection (its own error is above): {str(e).splitlines()[0][:300]}"
            ) from e

    def _oom_report(self) -> str:
        """On the rank that ran out of memory only (no collective: the others may be stuck in one)."""
        peak = peak_memory_bytes()
        return oom_report(self.job, self.shape, self.dist.world_size, self.dist.local_world_size, self.memory_plan.capacity_bytes,
                          peak.get("peak_cuda_reserved"), self.dist.rank, self.state.step + 1)

    def _samples_before(self) -> Optional[list[dict]]:
        if not self.job.generate.before_training:
            return None
        path = self.run_dir / "samples_before.jsonl"
        if self.resumed and path.is_file():  # generated by the run that wrote the checkpoint
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return self.generate_samples(path.name)

    def _log_step(self, record: dict, epoch: int, progress) -> None:
        step = self.state.step
        record.update(step=step, epoch=epoch)
        self.metrics.log(record)
        if record.get("skipped"):
            return
        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if step % self.job.train.log_every == 0 or step == 1:
            log.info("step %d/%d loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f", step, self.total_steps,
                     record["loss"], record["lr"], record["grad_norm"], record["tokens_per_s"])

    def _stop_for_preemption(self, watchdog: StepWatchdog) -> None:
        """Every rank got here at the same step (``agreed()`` is one reduction): save, then stop."""
        log.warning("preemption signal (%s on some rank): saving a checkpoint at step %d, then exiting",
                    self.preemption.signal_name or "received", self.state.step)
        watchdog.beat(f"preemption checkpoint at step {self.state.step}")
        if self.ckpt.last_saved_step != self.state.step:
            self.save_checkpoint()
        raise Preempted(f"stopped at step {self.state.step} on a preemption signal; checkpoint saved in {self.ckpt.root}")

    def save_checkpoint(self) -> Path:
        """Engine + trainer state under ``checkpoints/`` (collective: every rank writes its partitions)."""
        state = self.state
        # Written as of this step; all of it follows from the step and the guard, so it is filled in only here.
        state.epoch, state.step_in_epoch = divmod(state.step, self.sampler.steps_per_epoch)
        state.consumed_units = state.step * self.batch.global_batch_size
        state.bad_steps_in_a_row, state.recent_losses = self.guard.bad_in_a_row, list(self.guard.recent)
        return self.ckpt.save(self.engine, self.tokenizer, state)

    def train_step(self, micro_indices: list[list[int]], batches: list[dict[str, torch.Tensor]],
                   data_wait_s: float = 0.0) -> Optional[dict]:
        """One optimizer step over this rank's micro-batches, with the loss normalised by the global token count.

        The loss of the step is (sum of token cross-entropies over every trained token of every micro-batch on
        every rank) / (number of those tokens), so it does not depend on micro-batch size or world size.

        Args:
            micro_indices: The sampler's unit indices of each micro-batch of this rank.
            batches: Those micro-batches, collated (by the prefetcher).
            data_wait_s: How long the step waited for ``batches``.
        """
        t0 = time.perf_counter() - data_wait_s
        # Device syncs for the phase split only on logged steps: elsewhere kernels queue without a stall.
        timer = PhaseTimer(self.dist.device, synchronize=self.state.step == 0 or (self.state.step + 1) % self.job.train.log_every == 0)
        timer.seconds["data"] = data_wait_s
        examples = [e for idx in micro_indices for i in idx for e in self.train_units[i]]
        local_tokens = sum(count_trained_tokens(b["labels"]) for b in batches)
        local_real = sum(len(e.input_ids) for e in examples)
        local_sq = sum(len(e.input_ids) ** 2 for e in examples)
        local_slots = sum(b["input_ids"].numel() for b in batches)
        local_fingerprint = sum(zlib.crc32(e.source.encode()) for e in examples)
        # Sync point: the normaliser must be known on every rank before the first backward of the step.
        global_tokens, global_real, global_slots, global_sq, fingerprint = all_reduce_sum(
            [local_tokens, local_real, local_slots, local_sq, local_fingerprint], self.dist.device)
        self.state.real_tokens += int(global_real)
        self.state.token_slots += int(global_slots)
        self.state.trained_tokens += int(global_tokens)
        if global_tokens == 0:
            self.state.skipped_steps += 1
            log.warning("step %d: no trained token in the global batch; step skipped", self.state.step + 1)
            return None
        # DeepSpeed divides the loss by the accumulation steps and averages gradients over ranks; scaling by
        # both makes the final gradient exactly d(global token-mean loss).
        scale = self.batch.grad_accum_steps * self.batch.world_size / global_tokens
        injected = faults.loss_multiplier(self.state.step + 1, self.dist.rank)
        local_loss_sum = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        for k, batch in enumerate(batches):
            with timer("forward"):
                if k == 0 and self.job.train.measure_activations and self.measured_activations is None:
                    loss_sum = self._measure_activations(batch)
                else:
                    loss_sum = self._loss_sum(batch)
                if injected != 1.0:
                    loss_sum = loss_sum * injected
            measure_grads = k == len(batches) - 1 and not self.gradient_meter.done
            scaled_loss = loss_sum * scale
            if measure_grads:
                self.gradient_meter.watch_backward(scaled_loss)
            with timer("backward"):
                self.engine.backward(scaled_loss)
            if measure_grads:
                self.gradient_meter.before_step()
            with timer("optimizer"):
                # DeepSpeed steps the optimizer only at the accumulation boundary, and skips the update on every
                # rank when the global gradient norm is NaN/Inf (the overflow flag is reduced across ranks).
                self.engine.step()
            if measure_grads:
                self.gradient_meter.after_step()
            local_loss_sum += loss_sum.detach().double()
        (global_loss_sum,) = all_reduce_sum([local_loss_sum.item()], self.dist.device)
        elapsed = time.perf_counter() - t0
        loss = global_loss_sum / global_tokens
        verdict = self.guard.classify(loss, self.engine.was_step_applied(), self.job.precision.name == Precision.fp16)
        if verdict != "ok":
            self._report_unusual_step(verdict, loss, micro_indices)
        if verdict in ("nonfinite", "overflow"):
            self.state.skipped_steps += 1
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "loss": _finite_or_none(loss),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": _finite_or_none(float(grad_norm)) if grad_norm is not None else None,
            "tokens": int(global_tokens),
            "tokens_per_s": global_tokens / elapsed,
            "input_tokens_per_s": global_real / elapsed,
            "tokens_seen": self.state.real_tokens,
            "input_tokens": int(global_real),
            "padding_efficiency": global_real / global_slots,
            "step_time_s": elapsed,
            "samples_per_s": self.batch.global_batch_size / elapsed,
            "batch_fingerprint": int(fingerprint),  # sum of crc32(sample id): equal batches <=> equal data order
            **{f"time_{phase}_s": seconds if timer.reliable or phase == "data" else None for phase, seconds in timer.seconds.items()},
        }
        flops = step_flops(self.shape, int(global_real), int(global_sq), self.trainable_weights)
        record["tflops_per_gpu"] = flops / elapsed / self.dist.world_size / 1e12
        record["mfu"] = mfu(flops, elapsed, self.dist.world_size, self.peak_flops)
        if timer.seconds["data"] > 0.05 * elapsed and (self.state.step + 1) % 100 in (1,):
            log.warning("step %d: %.0f%% of the step went to preparing data (collation); the GPU waited",
                        self.state.step + 1, 100 * timer.seconds["data"] / elapsed)
        if verdict in ("nonfinite", "overflow"):
            record["skipped"] = verdict
        return record

    def _measure_activations(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One forward under saved-tensor hooks: the activation bytes of this micro-batch, next to the plan's."""
        loss_sum, saved = measure_saved_bytes(lambda: self._loss_sum(batch), exclude=list(self.engine.module.parameters()))
        rows, width = batch["input_ids"].shape
        job = self.job
        planned = activation_bytes(self.shape, rows, width, DTYPE_BYTES[job.precision.name], job.model.gradient_checkpointing,
                                   job.peft.r if job.peft.uses_adapters else 0, job.peft.uses_adapters and job.peft.dropout > 0,
                                   include_recompute=False, loss_chunk_size=job.train.loss_chunk_size,
                                   head_trainable=not job.peft.uses_adapters)
        self.measured_activations = {"micro_batch": rows, "seq_len": width, "measured_bytes": saved, "planned_bytes": planned}
        log.info("activations of one %d x %d micro-batch: measured %.1f MiB saved for backward, planned %.1f MiB",
                 rows, width, saved / 2**20, planned / 2**20)
        return loss_sum

    def _report_unusual_step(self, verdict: str, loss: float, micro_indices: list[list[int]]) -> None:
        """Warn with the ids of every sample of the step (a collective: the verdict is the same on all ranks)."""
        local_ids = [e.source for idx in micro_indices for i in idx for e in self.train_units[i]]
        ids = [s for rank_ids in all_gather_objects(local_ids) for s in rank_ids]
        step = self.state.step + 1
        shown = ", ".join(ids[:32]) + (f", ... ({len(ids)} in all)" if len(ids) > 32 else "")
        if verdict == "spike":
            log.warning("step %d: loss spike %.4f (over %gx the running median); samples: %s", step, loss, self.job.train.spike_factor, shown)
        elif verdict == "overflow":
            log.warning("step %d: fp16 gradient overflow, update skipped by the loss scaler (scale now %s)", step,
                        getattr(self.engine.optimizer, "loss_scale", "?"))
        else:
            log.warning("step %d: non-finite loss/gradient norm (loss %s), update skipped on every rank (%d in a row); samples: %s",
                        step, loss, self.guard.bad_in_a_row, shown)

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed token loss of one collated batch: from the logits, or by the chunked loss head when installed."""
        labels = batch["labels"].to(self.dist.device, non_blocking=True)
        if self.loss_head is None:
            return shifted_token_loss_sum(self._forward(batch), labels)
        self.loss_head.labels = labels  # consumed by the head in this forward; without labels it returns logits
        return self._forward(batch)

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the engine on one collated batch (a collective under ZeRO-3: parameters are gathered)."""
        # use_cache=False matters beyond memory: with a cache, transformers ignores packed position_ids and
        # packed examples would attend to each other.
        # non_blocking: a pinned batch is copied while the GPU is still busy; the kernels that read it wait for it.
        inputs = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()
                  if k in ("input_ids", "attention_mask", "position_ids")}
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
            loss_sum += float(self._loss_sum(batch))
            tokens += count_trained_tokens(batch["labels"])
        self.engine.train()
        total_loss, total_tokens = all_reduce_sum([loss_sum, tokens], self.dist.device)
        eval_loss = total_loss / max(total_tokens, 1)
        self.metrics.log({"step": self.state.step, "eval_loss": eval_loss, "eval_tokens": int(total_tokens)})
        log.info("step %d eval_loss %.4f (%d tokens)", self.state.step, eval_loss, total_tokens)
        return eval_loss

    # ------------------------------------------------------------------ outputs

    def save(self) -> Path:
        """Write ``final/`` (all ranks take part in the ZeRO-3 gather), then re-read it and check it on rank 0."""
        job = self.job
        final = self.run_dir / "final"
        is_lora = job.peft.uses_adapters
        shapes = save_model(self.engine.module, self.tokenizer, final, self.dist, is_lora, parse_size(job.export.max_shard_size))
        probe = self._write_probe()
        problem = None
        if self.dist.is_main:
            try:
                verify_export(final, shapes, probe, job, self.num_parameters)
            except ExportError as e:
                problem = str(e)
        # Every rank learns the verdict, so a bad export stops the whole job rather than rank 0 alone.
        problem = broadcast_object(problem)
        if problem:
            raise ExportError(problem)
        return final

    @torch.no_grad()
    def _write_probe(self) -> dict[str, torch.Tensor]:
        """The engine's logits on a short probe batch (kept as ``probe.safetensors``), to check the export against."""
        from safetensors.torch import save_file

        examples = (self.data.eval or self.data.train)[:2]
        batch = {k: v[:, :256] for k, v in collate(examples, self.pad_id).items()}  # cheap to re-run on CPU
        self.engine.eval()
        logits = self._forward(batch)
        self.engine.train()
        probe = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits": logits.float().cpu()}
        if self.dist.is_main:
            save_file(probe, str(self.run_dir / "probe.safetensors"))
        return probe

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

    def _report_memory(self) -> None:
        """Plan vs measured (engine tensors, peak memory) from every rank into ``memory.json`` (a gather)."""
        # Gradients from the first step's boundary: DeepSpeed has freed its gradient buffers by now.
        measured = all_gather_objects({**engine_state_bytes(self.engine), **self.gradient_meter.bytes, **peak_memory_bytes()})
        if self.dist.is_main:
            report = {"plan": self.memory_plan.as_dict(), "measured_per_rank": measured,
                      "activations_rank0": self.measured_activations}
            (self.run_dir / "memory.json").write_text(json.dumps(report, indent=1) + "\n")
            log.info("memory, plan vs measured:\n%s", compare_plan(self.memory_plan, measured))

    def _summarise(self, eval_loss: Optional[float], before: Optional[list[dict]], after: list[dict]) -> dict:
        summary = {
            "run_dir": str(self.run_dir),
            "final_dir": str(self.run_dir / "final"),
            "steps": self.state.step,
            "skipped_steps": self.state.skipped_steps,
            "padding_efficiency": self.state.real_tokens / max(self.state.token_slots, 1),
            "eval_loss": eval_loss,
            "accuracy_before": exact_match_accuracy(before) if before is not None else None,
            "accuracy_after": exact_match_accuracy(after) if after else None,
            "num_prompts": len(after),
        }
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            try:
                summary["report"] = str(render_report([self.run_dir], self.run_dir / "report.png"))
            except Exception as e:  # a plotting problem must not fail a finished run
                log.warning("could not draw report.png (%s); retry with python launch/report.py run_dir=%s", e, self.run_dir)
        self.metrics.summary(summary)
        wall = time.monotonic() - self.started
        log.info("done: %d steps (%d skipped), %s trained tokens of %s seen, eval loss %s, %.0f s, %.0f trained tokens/s",
                 self.state.step, self.state.skipped_steps, f"{self.state.trained_tokens:,}", f"{self.state.real_tokens:,}",
                 f"{eval_loss:.4f}" if eval_loss is not None else "-", wall, self.state.trained_tokens / max(wall, 1e-9))
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


def _is_collective_failure(error: RuntimeError) -> bool:
    """A communication backend's error (a peer died or timed out), as opposed to a bug in the step."""
    text = str(error)
    return any(marker in text for marker in ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out"))


def _finite_or_none(value: float) -> Optional[float]:
    """JSON has no NaN/Inf: a skipped step's loss is logged as null next to its ``skipped`` reason."""
    return value if math.isfinite(value) else None


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True, mininterval=2.0)
