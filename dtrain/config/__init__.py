"""Configuration: typed schemas, their ConfigStore registration, and the one-time conversion."""

from dtrain.config.registry import asset_path, compose_job, load_run_config, register_configs, to_job_config
from dtrain.config.schema import JobConfig

__all__ = ["JobConfig", "asset_path", "compose_job", "load_run_config", "register_configs", "to_job_config"]
