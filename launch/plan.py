"""Will it fit? Per-GPU memory for the chosen config and its alternatives, from the model config alone.

    python launch/plan.py +exp=7b_zero3 plan.gpus=8
    python launch/plan.py +exp=8b_zero3_offload plan.gpus=8 plan.nodes=2 plan.gpu=A100-40GB
    python launch/plan.py +exp=7b_lora plan.format=json
    python launch/plan.py +exp=8b_zero3_offload plan.gpus=8 plan.max_seq_len=search   # the longest sequence that fits

Loads no weights: the parameter count comes from the model's config.json built on the meta device.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from dtrain.architectures import model_shape
from dtrain.config import register_configs, to_job_config
from dtrain.config.schema import PlanFormat, Precision
from dtrain.errors import ConfigError, exit_on_error
from dtrain.memory.plan import GiB, format_plans, gpu_capacity_bytes, long_sequence_ladder, plan_job


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from transformers import AutoConfig

    if OmegaConf.is_missing(cfg.data, "path"):  # planning reads no data
        cfg.data.path = "(not needed to plan)"
    job = to_job_config(cfg)
    if job.precision.name == Precision.auto:  # the GPUs priced here (A100 and newer) compute bf16 natively
        job.precision.name = Precision.bf16
    with exit_on_error():
        capacity = gpu_capacity_bytes(job.plan.gpu, job.plan.gpu_memory_gb)
    config = AutoConfig.from_pretrained(
        job.model.config_path or job.model.path, trust_remote_code=job.model.trust_remote_code, revision=job.model.revision
    )
    shape = model_shape(config)
    world = job.plan.gpus * job.plan.nodes
    if job.plan.max_seq_len is not None:
        with exit_on_error():
            print_longest_sequences(job, shape, world, capacity)
        return
    plans = plan_job(job, shape, world, job.plan.gpus, capacity)
    if job.plan.format == PlanFormat.json:
        print(
            json.dumps(
                {
                    "model": job.model.path,
                    "num_parameters": shape.num_parameters,
                    "world_size": world,
                    "micro_batch_size": job.train.micro_batch_size,
                    "seq_len": job.data.max_seq_len,
                    "configs": [p.as_dict() for p in plans],
                },
                indent=1,
            )
        )
        return
    print(
        f"{job.model.path}: {shape.num_parameters / 1e9:.2f}B parameters; {world} GPUs ({job.plan.gpus} x {job.plan.nodes} nodes, "
        f"{capacity / 10**9 if capacity else '?'} GB each); micro batch {job.train.micro_batch_size} x {job.data.max_seq_len} tokens, "
        f"{job.precision.name.value}; GiB per GPU:"
    )
    print(format_plans(plans))
    print(f"(* = the config as given; activations assume full rows of data.max_seq_len; GiB = {GiB} bytes)")


def print_longest_sequences(job, shape, world: int, capacity) -> None:
    if job.plan.max_seq_len != "search" or capacity is None:
        raise ConfigError("plan.max_seq_len=search needs a GPU capacity (plan.gpu or plan.gpu_memory_gb)")
    rungs = long_sequence_ladder(job, shape, world_size=world, gpus_per_node=job.plan.gpus, capacity_bytes=capacity)
    if job.plan.format == PlanFormat.json:
        print(json.dumps([{"overrides": o, "setup": s.label, "max_seq_len": n} for o, s, n in rungs], indent=1))
        return
    gpus = f"{world} x {capacity / 10**9:.0f} GB"
    print(f"{job.model.path}: the longest sequence that fits ({gpus}, micro batch 1, {job.precision.name.value}):")
    for overrides, setup, longest in rungs:
        print(f"  {longest:>10,}  {setup.label:<48} {overrides}")


if __name__ == "__main__":
    register_configs()
    main()
