"""What a run leaves after its loop: the exported model (checked), the generation check, memory, summary, report.

    deepspeed --num_gpus 2 launch/train.py +exp=tiny_cpu     # -> outputs/tiny_cpu/{final,samples.jsonl,...}

Every method is called on every rank: the export gathers ZeRO-3 partitions, generation under ZeRO-3 runs the
forward on all ranks, the memory report gathers every rank's figures. Only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dtrain.config.schema import JobConfig
from dtrain.data.chat import ChatRenderer
from dtrain.data.dataset import PreparedData
from dtrain.data.loader import probe_batch
from dtrain.disk import atomic_write_text
from dtrain.dist import DistInfo, all_gather_objects, broadcast_object, on_main_rank
from dtrain.errors import DiskFull, ExportError
from dtrain.export import parse_size, save_model, verify_export
from dtrain.generation import exact_match_accuracy, format_samples, generate_answers, merge_shards, shard_prompts
from dtrain.memory.meters import engine_state_bytes, peak_memory_bytes
from dtrain.memory.plan import MemoryPlan, compare_plan
from dtrain.report import render_report

log = logging.getLogger("dtrain")

PROBE_TOKENS = 256
"""The export's logits check runs this many tokens of the first two eval examples (cheap to re-run on CPU)."""


@dataclass
class RunTotals:
    """The counters the summary reports (from the trainer's state)."""

    steps: int
    skipped_steps: int
    real_tokens: int
    token_slots: int
    trained_tokens: int


class RunOutputs:
    """The run's outputs in ``run_dir``.

    Args:
        job: The resolved job.
        run_dir: The run directory (one for all ranks).
        dist: This rank.
        engine: The DeepSpeed engine (its module is exported and generates).
        forward: Logits of the engine on a collated batch (the trainer's forward).
        tokenizer: Saved with the model.
        renderer: Renders the held-out prompts for generation.
        data: Eval examples (the probe) and held-out prompts.
        num_parameters: The model's size (decides the logits check under ``export.verify=auto``).
    """

    def __init__(
        self,
        job: JobConfig,
        run_dir: Path,
        dist: DistInfo,
        engine,
        forward: Callable[[dict], torch.Tensor],
        tokenizer,
        renderer: ChatRenderer,
        data: PreparedData,
        num_parameters: int,
    ):
        self.job, self.run_dir, self.dist, self.engine, self.forward = job, run_dir, dist, engine, forward
        self.tokenizer, self.renderer, self.data, self.num_parameters = tokenizer, renderer, data, num_parameters

    def export(self) -> Path:
        """Write ``final/`` (all ranks take part in the ZeRO-3 gather), then re-read it and check it on rank 0."""
        final = self.run_dir / "final"
        shapes = save_model(
            self.engine.module, self.tokenizer, final, self.dist, self.job.peft.uses_adapters, parse_size(self.job.export.max_shard_size)
        )
        probe = self._write_probe()
        # Every rank learns the verdict, so a bad export stops the whole job rather than rank 0 alone.
        on_main_rank(self.dist, lambda: verify_export(final, shapes, probe, self.job, self.num_parameters), ExportError)
        return final

    @torch.no_grad()
    def _write_probe(self) -> dict[str, torch.Tensor]:
        """The engine's logits on a short probe batch (kept as ``probe.safetensors``), to check the export against."""
        from safetensors.torch import save_file

        batch = probe_batch((self.data.eval or self.data.train)[:2], self.tokenizer.pad_token_id, PROBE_TOKENS)
        self.engine.eval()
        logits = self.forward(batch)
        self.engine.train()
        probe = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits": logits.float().cpu()}
        if self.dist.is_main:
            save_file(probe, str(self.run_dir / "probe.safetensors"))
        return probe

    def generate(self, filename: str) -> list[dict]:
        """Greedy answers to the held-out prompts, written to ``filename`` in the run directory."""
        if not self.data.prompts:
            return []
        # Each rank decodes its share; ZeRO-3's gathers keep the ranks stepping together (synced_gpus) until all end.
        prompts, own = shard_prompts(self.data.prompts, self.dist.rank, self.dist.world_size)
        answers = generate_answers(
            self.engine.module,
            self.renderer,
            prompts,
            device=self.dist.device,
            max_new_tokens=self.job.generate.max_new_tokens,
            synced_gpus=self.job.zero.stage == 3 and self.dist.world_size > 1,
        )
        results = merge_shards(all_gather_objects(answers[:own]), len(self.data.prompts))
        if self.dist.is_main:
            with (self.run_dir / filename).open("w") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
        log.info("%s: exact match %.1f%% on %d held-out prompts", filename, 100 * exact_match_accuracy(results), len(results))
        return results

    def samples_before(self, resumed: bool) -> Optional[list[dict]]:
        """The generation check before training (``generate.before_training``); a resumed run reads its file."""
        if not self.job.generate.before_training:
            return None
        path = self.run_dir / "samples_before.jsonl"
        if resumed and path.is_file():  # generated by the run that wrote the checkpoint
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return self.generate(path.name)

    def report_memory(self, plan: MemoryPlan, gradient_bytes: dict[str, int], activations: Optional[dict]) -> None:
        """Plan vs measured (engine tensors, peak memory) from every rank into ``memory.json`` (a gather)."""
        # Gradients from the first step's boundary: DeepSpeed has freed its gradient buffers by now.
        measured = all_gather_objects({**engine_state_bytes(self.engine), **gradient_bytes, **peak_memory_bytes()})
        if self.dist.is_main:
            report = {"plan": plan.as_dict(), "measured_per_rank": measured, "activations_rank0": activations}
            (self.run_dir / "memory.json").write_text(json.dumps(report, indent=1) + "\n")
            log.info("memory, plan vs measured:\n%s", compare_plan(plan, measured))

    def summarise(
        self, totals: RunTotals, eval_loss: Optional[float], before: Optional[list[dict]], after: list[dict], wall_s: float
    ) -> dict[str, Any]:
        """``summary.json`` and ``report.png`` (rank 0), and the closing log lines."""
        summary = {
            "run_dir": str(self.run_dir),
            "final_dir": str(self.run_dir / "final"),
            "steps": totals.steps,
            "skipped_steps": totals.skipped_steps,
            "padding_efficiency": totals.real_tokens / max(totals.token_slots, 1),
            "eval_loss": eval_loss,
            "accuracy_before": exact_match_accuracy(before) if before is not None else None,
            "accuracy_after": exact_match_accuracy(after) if after else None,
            "num_prompts": len(after),
        }
        problem = None
        if self.dist.is_main:
            try:
                atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n", "summary.json")
                if self.job.report:
                    summary["report"] = str(render_report([self.run_dir], self.run_dir / "report.png"))
            except DiskFull as e:  # the model is exported, but the user must hear of the full disk
                problem = str(e)
            except Exception as e:  # a plotting problem must not fail a finished run
                log.warning("could not draw report.png (%s); retry with python launch/report.py run_dir=%s", e, self.run_dir)
        # Every rank learns of a full disk and stops with it (exit code 28), not rank 0 alone.
        problem = broadcast_object(problem)
        if problem:
            raise DiskFull(f"{problem} (the trained model in {self.run_dir / 'final'} is complete)", every_rank=True)
        log.info(
            "done: %d steps (%d skipped), %s trained tokens of %s seen, eval loss %s, %.0f s, %.0f trained tokens/s",
            totals.steps,
            totals.skipped_steps,
            f"{totals.trained_tokens:,}",
            f"{totals.real_tokens:,}",
            f"{eval_loss:.4f}" if eval_loss is not None else "-",
            wall_s,
            totals.trained_tokens / max(wall_s, 1e-9),
        )
        if after:
            log.info("generation check (%s/samples.jsonl):\n%s", self.run_dir, format_samples(after))
        if before is not None:
            log.info(
                "exact match on %d held-out prompts: %.1f%% before training -> %.1f%% after",
                len(after),
                100 * summary["accuracy_before"],
                100 * (summary["accuracy_after"] or 0.0),
            )
        return summary
