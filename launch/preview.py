"""Preview the training data: rendered text with trained tokens highlighted, or the exact tensors as JSON.

    python launch/preview.py +exp=tiny_cpu preview.n=3
    python launch/preview.py +exp=tiny_cpu data.packing=true preview.format=json preview.n=2

Runs in one process, loads no model: only the tokenizer and the data, resolved and batched exactly as training
does (``dtrain.resolve``, ``dtrain.data.loader``).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from dtrain.config import register_configs, to_job_config
from dtrain.config.batch import BatchPlan
from dtrain.config.checks import check_data_sources
from dtrain.config.schema import PreviewFormat
from dtrain.data import mixture_weights
from dtrain.data.cache import load_or_prepare
from dtrain.data.loader import TrainLoader, collate_units
from dtrain.data.preview import preview_json, preview_text
from dtrain.errors import exit_on_error
from dtrain.resolve import resolve_job
from dtrain.setup import load_renderer


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    job = to_job_config(cfg)
    with exit_on_error():
        check_data_sources(job.data)
        renderer = load_renderer(job)
        tokenizer = renderer.tokenizer
        # The store training reads (prepared here when missing, so training then finds it).
        data = load_or_prepare(job.data, renderer, job.train.seed, job.generate.num_prompts, is_local_main=True, barrier=lambda: None)
        job = resolve_job(job, data.train.lengths, world_size=1).job
        # The training loader over the same units; a step of one unit, since only the units are shown, in data order.
        loader = TrainLoader(
            data.train,
            BatchPlan(1, 1, 1),
            0,
            packing=bool(job.data.packing),
            max_seq_len=job.data.max_seq_len,
            seed=job.train.seed,
            grouping=job.data.group_by_length,
            pad_token_id=tokenizer.pad_token_id,
            weights=mixture_weights(job.data, data.source_names),
        )
    units = [loader.unit_examples(u) for u in range(min(job.preview.n, len(loader.units)))]
    if job.preview.format == PreviewFormat.json:
        print("\n".join(preview_json(units, lambda unit: collate_units([unit], loader.packing, loader.pad_token_id), loader.packing)))
    else:
        print(preview_text(units, tokenizer, color=sys.stdout.isatty()))


if __name__ == "__main__":
    register_configs()
    main()
