"""Registers the schemas with Hydra's ConfigStore and converts a composed config once into dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from dtrain.config.schema import ConvertJobConfig, ExportJobConfig, JobConfig, ReportJobConfig
from dtrain.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


def asset_path(name: str) -> str:
    """Absolute path of a bundled asset (``dtrain/assets/<name>``), usable as ``${dtrain_asset:tiny}``."""
    return str(ASSETS_DIR / name)


def register_configs() -> None:
    """Register ``job_schema`` (the typed root every ``conf/train.yaml`` merge is checked against).

    Idempotent, so tests and entry points may both call it.
    """
    ConfigStore.instance().store(name="job_schema", node=JobConfig)
    ConfigStore.instance().store(name="export_schema", node=ExportJobConfig)
    ConfigStore.instance().store(name="report_schema", node=ReportJobConfig)
    ConfigStore.instance().store(name="convert_schema", node=ConvertJobConfig)
    if not OmegaConf.has_resolver("dtrain_asset"):
        OmegaConf.register_new_resolver("dtrain_asset", asset_path)


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Resolve interpolations and convert the composed config into a ``JobConfig`` (done once, in ``launch/``).

    Raises:
        ConfigKeyError: for a key the schema does not know. Hydra lets ``+key=value`` add keys even to typed
            nodes; such a key would otherwise be carried along and silently ignored.
    """
    _reject_unknown_keys(cfg, JobConfig, "")
    job = OmegaConf.to_object(cfg)
    if not isinstance(job, JobConfig):  # a config composed without the schema would lose all validation
        raise TypeError("the composed config is not typed by job_schema; is `job_schema` first in conf/train.yaml's defaults?")
    return job


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key == "hydra":
            continue
        if key not in known:
            raise ConfigKeyError(f"unknown config key '{prefix}{key}' (not in {schema.__name__}); check its spelling")
        child_schema = OmegaConf.get_type(node, key) if isinstance(node._get_node(key), DictConfig) else None
        if child_schema is not None and dataclasses.is_dataclass(child_schema):
            _reject_unknown_keys(node[key], child_schema, f"{prefix}{key}.")


def compose_job(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> JobConfig:
    """Compose ``conf/train.yaml`` with command-line style overrides, outside ``@hydra.main`` (tests, tools).

    Args:
        overrides: e.g. ``["+exp=tiny_cpu", "train.max_steps=5"]``.
        conf_dir: The config tree (``conf/`` of this repo by default).

    Returns:
        The validated, resolved ``JobConfig``.
    """
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return to_job_config(cfg)


def load_run_config(run_dir: Path) -> JobConfig:
    """The typed config of a finished run, from the ``config.yaml`` it wrote (checked against the schema)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {run_dir} a run directory written by launch/train.py?")
    written = OmegaConf.load(path)
    grouping = OmegaConf.select(written, "data.group_by_length")
    if isinstance(grouping, bool):  # written before it became a choice: true grouped across steps, false did not sort
        written.data.group_by_length = "across_steps" if grouping else "none"
    merged = OmegaConf.merge(OmegaConf.structured(JobConfig), written)
    return OmegaConf.to_object(merged)
