"""Preview the training data: rendered text with trained tokens highlighted, or the exact tensors as JSON.

    python launch/preview.py +exp=tiny_cpu preview.n=3
    python launch/preview.py +exp=tiny_cpu data.packing=true preview.format=json preview.n=2

Runs in one process, loads no model: only the tokenizer and the data, exactly as training prepares them.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from dtrain.config import register_configs, to_job_config
from dtrain.config.schema import PreviewFormat
from dtrain.data import ChatRenderer, DataError, prepare_data, resolve_chat_template
from dtrain.data.packing import choose_packing, pack_examples
from dtrain.data.preview import preview_json, preview_text
from dtrain.model import load_tokenizer


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    job = to_job_config(cfg)
    try:
        tokenizer = load_tokenizer(job.model)
        resolve_chat_template(tokenizer, job.data.chat_template)
        renderer = ChatRenderer(tokenizer, job.data.train_on, job.data.end_of_turn_token)
        data = prepare_data(job.data, renderer, job.train.seed, num_prompts=0)
    except DataError as e:
        sys.exit(f"dtrain: error: {e}")
    if job.data.packing is None:
        job.data.packing, _ = choose_packing([len(e.input_ids) for e in data.train], job.train.micro_batch_size, job.train.seed)
    if job.data.packing:
        rows = pack_examples([len(e.input_ids) for e in data.train], job.data.max_seq_len, job.train.seed)
        units = [[data.train[i] for i in row] for row in rows[: job.preview.n]]
    else:
        units = [[e] for e in data.train[: job.preview.n]]
    if job.preview.format == PreviewFormat.json:
        print("\n".join(preview_json(units, tokenizer.pad_token_id, job.data.packing)))
    else:
        print(preview_text(units, tokenizer, color=sys.stdout.isatty()))


if __name__ == "__main__":
    register_configs()
    main()
