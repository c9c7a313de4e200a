"""The out-of-memory report for a 7B full fine-tune that cannot fit one 80 GB GPU."""

from transformers import AutoConfig

from dtrain.config import asset_path, compose_job
from dtrain.memory.plan import ModelShape
from dtrain.model import count_parameters_from_config
from dtrain.oom import oom_report, oom_suggestions


def seven_b():
    config = AutoConfig.from_pretrained(asset_path("configs/llama2_7b"))
    return ModelShape.from_hf_config(config, count_parameters_from_config(config))


def test_suggestions_for_a_7b_full_finetune_on_one_gpu():
    job = compose_job(
        ["+exp=7b_zero3", "data.path=/d.jsonl", "zero=zero2", "model.gradient_checkpointing=false", "train.micro_batch_size=4"]
    )
    suggestions = oom_suggestions(job, seven_b(), world_size=1, gpus_per_node=1, capacity=80 * 10**9)
    names = [s[0] for s in suggestions]
    assert names == [
        "data.max_seq_len=2048",
        "train.micro_batch_size=2 train.grad_accum_steps=16",
        "model.gradient_checkpointing=true",
        "zero=zero3",
        "zero=zero2_offload",
        "peft=lora",
        "peft=qlora",
        "model.tiled_mlp=true",
        "train.loss_chunk_size=4096",
        "model.gradient_checkpointing=true model.activation_offload=true",
    ]
    fits = dict((n, f) for n, _, f in suggestions)
    assert not any(fits.values())  # at micro-batch 4 x 4096 tokens without recomputation no single change is enough
    report = oom_report(job, seven_b(), 1, 1, 80 * 10**9, measured_peak=79 * 2**30, rank=0, step=1)
    assert report.startswith("out of memory on rank 0 at step 1 (measured peak 79.0 GiB of 74.5 GiB")
    assert "activations the largest part" in report
    assert (
        "Together (keeping data.max_seq_len): train.micro_batch_size=1 train.grad_accum_steps=32 "
        "model.gradient_checkpointing=true zero=zero3_offload"
    ) in report


def test_a_long_row_is_told_which_long_sequence_switch_makes_it_fit():
    """An 8B LoRA run at 256k tokens on 8 x 80 GB: only sequence parallelism over the 8 GPUs fits it alone."""
    config = AutoConfig.from_pretrained(asset_path("configs/llama3_8b"))
    shape = ModelShape.from_hf_config(config, count_parameters_from_config(config))
    job = compose_job(["+exp=7b_lora", "data.path=/d.jsonl", "data.max_seq_len=262144", "train.micro_batch_size=1"])
    fits = {name: fit for name, _, fit in oom_suggestions(job, shape, world_size=8, gpus_per_node=8, capacity=80 * 10**9)}
    assert fits["parallel.sp_size=8"] and not fits["model.tiled_mlp=true"] and not fits["train.loss_chunk_size=4096"]
    assert not fits["data.max_seq_len=131072"]  # halving the row is not enough either
