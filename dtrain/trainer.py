"""The SFT loop on the DeepSpeed engine: set-up, train, train_step, evaluate, save_checkpoint, close.

Run through ``launch/train.py`` (``deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu``). Every rank runs this
code; collectives (token counts, eval sums, ZeRO-3 gathers, generation under ZeRO-3) are reached by all ranks in
the same order, and only rank 0 writes files. The set-up is ``dtrain/run.py``, the batches come from
``dtrain/data/loader.py``, the outputs after the loop from ``dtrain/outputs.py``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import closing
from dataclasses import asdict
from typing import Optional

import torch

from dtrain.config.schema import JobConfig, Precision
from dtrain.data.loader import BatchStats, SourceLosses, StepBatch, eval_batches
from dtrain.dist import all_gather_objects, all_reduce_sum, barrier, broadcast_object, leave_process_group
from dtrain.errors import DiskFull, Preempted
from dtrain.guard import StepGuard, step_failures
from dtrain.memory.meters import GradientMeter, measure_activations
from dtrain.metrics import EvalRecord, MetricsLogger, StepRecord
from dtrain.outputs import RunOutputs, RunTotals
from dtrain.preemption import PreemptionFlag
from dtrain.run import build_run
from dtrain.throughput import PhaseTimer, mfu, step_flops
from dtrain.watchdog import StepWatchdog

log = logging.getLogger("dtrain")


class Trainer:
    """One fine-tuning job. Construct it on every rank, then ``train()`` and ``close()``."""

    def __init__(self, job: JobConfig):
        run = self.run = build_run(job)
        self.job, self.dist, self.state = run.job, run.dist, run.state
        self.engine, self.loss, self.loader, self.batch = run.engine, run.parts.loss, run.loader, run.loader.sampler.batch
        self.guard = StepGuard(
            self.job.train.max_bad_steps, self.job.train.spike_factor, self.state.bad_steps_in_a_row, self.state.recent_losses
        )
        self.preemption = PreemptionFlag(self.dist.device)
        self.gradient_meter = GradientMeter(self.engine)
        self.measured_activations: Optional[dict] = None
        self.metrics = MetricsLogger(
            run.run_dir,
            self.dist.is_main,
            self.job.wandb,
            _plain(self.job),
            self.job.run_name,
            resume_step=self.state.step if run.resumed else None,
            tensorboard=self.job.tensorboard,
        )
        self.outputs = RunOutputs(
            self.job,
            run.run_dir,
            self.dist,
            self.engine,
            self.loss.forward,
            run.data.tokenizer,
            run.data.renderer,
            run.data.data,
            run.shape.num_parameters,
        )
        self.started = time.monotonic()

    # ------------------------------------------------------------------ training

    def train(self) -> dict:
        """Run the remaining optimizer steps, evaluate, checkpoint, export ``final/`` and run the generation check.

        Raises:
            Preempted: a rank got SIGTERM/SIGUSR1; every rank saved a checkpoint at the same step first.
        """
        job, state, total = self.job, self.state, self.run.total_steps
        before = self.outputs.samples_before(self.run.resumed)
        watchdog = StepWatchdog(60 * job.train.step_timeout_minutes, self.dist.rank)
        progress = _progress(total, self.dist.is_main, initial=state.step)
        try:
            with closing(self.loader.step_batches(state.step, pin_memory=self.dist.device.type == "cuda")) as batches:
                for batch in batches:
                    if state.step >= total:
                        break
                    preempted, failed = self.preemption.agreed(failed=self.metrics.failure is not None)
                    if failed:
                        self._stop_for_failed_write()
                    if preempted:
                        self._stop_for_preemption(watchdog)
                    watchdog.beat(f"step {state.step + 1}")
                    with step_failures(state.step + 1, self.dist.rank, lambda: self.run.oom_report(state.step + 1)) as fault:
                        record = self.train_step(batch, loss_multiplier=fault)
                    state.step += 1
                    if record is not None:
                        self._log_step(record, progress)
                    progress.update(1)
                    if job.train.eval_every and state.step % job.train.eval_every == 0 and state.step < total:
                        watchdog.beat(f"eval after step {state.step}")
                        self.evaluate()
                    if job.ckpt.every_steps and state.step % job.ckpt.every_steps == 0:
                        watchdog.beat(f"checkpoint save at step {state.step}")
                        self.save_checkpoint()
            progress.close()
            watchdog.beat("final eval, checkpoint and export")
            eval_loss = self.evaluate()
            if self.preemption.agreed(failed=self.metrics.failure is not None)[1]:
                self._stop_for_failed_write()
            if self.run.ckpt.last_saved_step != state.step:
                self.save_checkpoint()
            self.outputs.export()
            watchdog.beat("generation check")
            after = self.outputs.generate("samples.jsonl")
            self.outputs.report_memory(self.run.memory_plan, self.gradient_meter.bytes, self.measured_activations)
        finally:
            watchdog.stop()
        totals = RunTotals(state.step, state.skipped_steps, state.real_tokens, state.token_slots, state.trained_tokens)
        summary = self.outputs.summarise(totals, eval_loss, before, after, time.monotonic() - self.started)
        self.metrics.summary(summary)
        return summary

    def train_step(self, batch: StepBatch, loss_multiplier: float = 1.0) -> Optional[StepRecord]:
        """One optimizer step over this rank's micro-batches, with the loss normalised by the global token count.

        The loss of the step is (sum of token cross-entropies over every trained token of every micro-batch on
        every rank) / (number of those tokens), so it does not depend on micro-batch size or world size.

        Returns:
            The step's record, or None when the global batch had no trained token (the step is skipped).
        """
        t0 = time.perf_counter() - batch.data_wait_s
        # Device syncs for the phase split only on logged steps: elsewhere kernels queue without a stall.
        timer = PhaseTimer(self.dist.device, synchronize=self.state.step == 0 or (self.state.step + 1) % self.job.train.log_every == 0)
        timer.seconds["data"] = batch.data_wait_s
        # Sync point: the normaliser must be known on every rank before the first backward of the step.
        total = BatchStats.from_list(all_reduce_sum(batch.stats.as_list(), self.dist.device))
        self.state.real_tokens += total.real_tokens
        self.state.token_slots += total.token_slots
        self.state.trained_tokens += total.trained_tokens
        if total.trained_tokens == 0:
            self.state.skipped_steps += 1
            log.warning("step %d: no trained token in the global batch; step skipped", self.state.step + 1)
            return None
        # DeepSpeed divides the loss by the accumulation steps and the gradients summed over all ranks by the
        # data-parallel size (see gradient_divisor); scaling by both makes the final gradient exactly d(global
        # token-mean loss). Under sequence parallelism each rank's loss sum covers its own piece of the sequences.
        scale = self.batch.grad_accum_steps * self.run.parts.gradient_divisor / total.trained_tokens
        local_loss_sum = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        sources = SourceLosses(self.run.data.data.source_names) if "target_sources" in batch.micro_batches[0] else None
        last = len(batch.micro_batches) - 1
        for k, micro_batch in enumerate(batch.micro_batches):
            # Activation offload holds the micro-batch's checkpointed layer inputs on the host from forward to backward.
            with self.loss.offload():
                with timer("forward"):
                    loss_sum = self._micro_batch_loss(micro_batch, first=k == 0)
                    if loss_multiplier != 1.0:
                        loss_sum = loss_sum * loss_multiplier
                measure_grads = k == last and not self.gradient_meter.done
                if measure_grads:
                    self.gradient_meter.watch_backward(loss_sum)
                with timer("backward"):
                    self.engine.backward(loss_sum * scale)
            if measure_grads:
                self.gradient_meter.before_step()
            with timer("optimizer"):
                # DeepSpeed steps the optimizer only at the accumulation boundary, and skips the update on every
                # rank when the global gradient norm is NaN/Inf (the overflow flag is reduced across ranks).
                self.engine.step()
            if measure_grads:
                self.gradient_meter.after_step()
            local_loss_sum += loss_sum.detach().double()
            if sources is not None:
                sources.add(self.loss.source_sums, micro_batch["targets"], micro_batch["target_sources"])
        # One reduction for the step's loss and, in a mixture, each source's loss sum and token count.
        reduced = all_reduce_sum([local_loss_sum.item(), *(sources.as_list() if sources else [])], self.dist.device)
        record = self._step_record(reduced[0] / total.trained_tokens, total, batch, timer, time.perf_counter() - t0)
        record.source_loss = sources.losses(reduced[1:]) if sources else None
        return record

    def _micro_batch_loss(self, micro_batch: dict[str, torch.Tensor], first: bool) -> torch.Tensor:
        """Summed token loss of one micro-batch; the run's first one is measured when ``train.measure_activations``."""
        if first and self.job.train.measure_activations and self.measured_activations is None:
            loss_sum, self.measured_activations = measure_activations(self.loss, micro_batch, self.engine, self.job, self.run.shape)
            return loss_sum
        return self.loss(micro_batch)

    def _step_record(self, loss: float, total: BatchStats, batch: StepBatch, timer: PhaseTimer, elapsed: float) -> StepRecord:
        """Judge the step (non-finite, spike) and measure it (throughput, MFU, phases)."""
        verdict = self.guard.classify(loss, self.engine.was_step_applied(), self.job.precision.name == Precision.fp16)
        if verdict != "ok":
            self._report_unusual_step(verdict, loss, batch)
        skipped = verdict if verdict in ("nonfinite", "overflow") else None
        if skipped:
            self.state.skipped_steps += 1
        grad_norm = self.engine.get_global_grad_norm()
        flops = step_flops(self.run.shape, total.real_tokens, total.sum_sq_lengths, self.run.parts.trainable_weights)
        phases = {f"time_{p}_s": s if timer.reliable or p == "data" else None for p, s in timer.seconds.items()}
        if timer.seconds["data"] > 0.05 * elapsed and (self.state.step + 1) % 100 == 1:
            log.warning(
                "step %d: %.0f%% of the step went to preparing data (collation); the GPU waited",
                self.state.step + 1,
                100 * timer.seconds["data"] / elapsed,
            )
        return StepRecord(
            step=self.state.step + 1,
            epoch=batch.epoch,
            loss=_finite_or_none(loss),
            lr=self.run.parts.scheduler.get_last_lr()[0],
            grad_norm=_finite_or_none(float(grad_norm)) if grad_norm is not None else None,
            tokens=total.trained_tokens,
            input_tokens=total.real_tokens,
            tokens_seen=self.state.real_tokens,
            tokens_per_s=total.trained_tokens / elapsed,
            input_tokens_per_s=total.real_tokens / elapsed,
            padding_efficiency=total.real_tokens / total.token_slots,
            step_time_s=elapsed,
            samples_per_s=self.batch.global_batch_size / elapsed,
            batch_fingerprint=total.fingerprint,
            tflops_per_gpu=flops / elapsed / self.dist.world_size / 1e12,
            mfu=mfu(flops, elapsed, self.dist.world_size, self.run.peak_flops),
            skipped=skipped,
            **phases,
        )

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Token-mean loss over the whole eval split, summed across ranks. Logged as ``eval_loss``."""
        examples = self.run.data.data.eval
        if not examples:
            return None
        self.engine.eval()
        loss_sum, tokens = 0.0, 0
        names = self.run.data.data.source_names
        sources = SourceLosses(names) if len(names) > 1 else None
        pad_id, micro = self.run.data.tokenizer.pad_token_id, self.job.train.micro_batch_size
        for batch, trained in eval_batches(examples, self.dist.rank, self.dist.world_size, micro, pad_id, len(names)):
            loss_sum += float(self.loss(batch))
            tokens += trained
            if sources is not None:
                sources.add(self.loss.source_sums, batch["targets"], batch["target_sources"])
        self.engine.train()
        reduced = all_reduce_sum([loss_sum, tokens, *(sources.as_list() if sources else [])], self.dist.device)
        total_loss, total_tokens, per_source = reduced[0], reduced[1], reduced[2:]
        eval_loss = total_loss / max(total_tokens, 1)
        by_source = sources.losses(per_source) if sources else None
        self.metrics.log(EvalRecord(step=self.state.step, eval_loss=eval_loss, eval_tokens=int(total_tokens), source_eval_loss=by_source))
        log.info("step %d eval_loss %.4f (%d tokens)", self.state.step, eval_loss, total_tokens)
        return eval_loss

    # ------------------------------------------------------------------ checkpoints and logging

    def save_checkpoint(self):
        """Engine + trainer state under ``checkpoints/`` (collective: every rank writes its partitions)."""
        state = self.state
        # Written as of this step; all of it follows from the step and the guard, so it is filled in only here.
        state.epoch, state.step_in_epoch = divmod(state.step, self.loader.steps_per_epoch)
        state.consumed_units = state.step * self.batch.global_batch_size
        state.bad_steps_in_a_row, state.recent_losses = self.guard.bad_in_a_row, list(self.guard.recent)
        return self.run.ckpt.save(self.engine, self.run.data.tokenizer, state)

    def _stop_for_preemption(self, watchdog: StepWatchdog) -> None:
        """Every rank got here at the same step (``agreed()`` is one reduction): save, then stop."""
        log.warning(
            "preemption signal (%s on some rank): saving a checkpoint at step %d, then exiting",
            self.preemption.signal_name or "received",
            self.state.step,
        )
        watchdog.beat(f"preemption checkpoint at step {self.state.step}")
        if self.run.ckpt.last_saved_step != self.state.step:
            self.save_checkpoint()
        raise Preempted(f"stopped at step {self.state.step} on a preemption signal; checkpoint saved in {self.run.ckpt.root}")

    def _stop_for_failed_write(self) -> None:
        """Every rank got here together (``agreed()``): raise rank 0's reason on all of them."""
        raise DiskFull(broadcast_object(self.metrics.failure if self.dist.is_main else None), every_rank=True)

    def _log_step(self, record: StepRecord, progress) -> None:
        self.metrics.log(record)
        if record.skipped:
            return
        progress.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.lr:.2e}")
        if record.step % self.job.train.log_every == 0 or record.step == 1:
            log.info(
                "step %d/%d loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f",
                record.step,
                self.run.total_steps,
                record.loss,
                record.lr,
                record.grad_norm,
                record.tokens_per_s,
            )

    def _report_unusual_step(self, verdict: str, loss: float, batch: StepBatch) -> None:
        """Warn with the ids of every sample of the step (a collective: the verdict is the same on all ranks)."""
        ids = [s for rank_ids in all_gather_objects([e.source for e in batch.examples]) for s in rank_ids]
        step = self.state.step + 1
        shown = ", ".join(ids[:32]) + (f", ... ({len(ids)} in all)" if len(ids) > 32 else "")
        if verdict == "spike":
            log.warning(
                "step %d: loss spike %.4f (over %gx the running median); samples: %s", step, loss, self.job.train.spike_factor, shown
            )
        elif verdict == "overflow":
            log.warning(
                "step %d: fp16 gradient overflow, update skipped by the loss scaler (scale now %s)",
                step,
                getattr(self.engine.optimizer, "loss_scale", "?"),
            )
        else:
            log.warning(
                "step %d: non-finite loss/gradient norm (loss %s), update skipped on every rank (%d in a row); samples: %s",
                step,
                loss,
                self.guard.bad_in_a_row,
                shown,
            )

    def close(self) -> None:
        self.metrics.close()
        barrier()  # every rank is done with the run directory before its lock goes
        if self.run.lock is not None:
            self.run.lock.release()
        leave_process_group()


def _plain(job: JobConfig) -> dict:
    """The job as plain JSON-able values (enums as strings), for W&B's run config."""
    return json.loads(json.dumps(asdict(job), default=lambda v: getattr(v, "value", str(v))))


def _finite_or_none(value: float) -> Optional[float]:
    """JSON has no NaN/Inf: a skipped step's loss is logged as null next to its ``skipped`` reason."""
    return value if math.isfinite(value) else None


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True, mininterval=2.0)
