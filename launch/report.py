"""Draw the run report of a run directory (also written at the end of training), or compare several.

python launch/report.py run_dir=outputs/tiny_cpu                       # -> outputs/tiny_cpu/report.png
python launch/report.py run_dir=outputs/a 'compare=[outputs/b,outputs/c]'   # curves overlaid
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dtrain.config import register_configs
from dtrain.config.schema import ReportJobConfig
from dtrain.errors import ConfigError, exit_on_error
from dtrain.report import render_report


@hydra.main(config_path="../conf", config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    job: ReportJobConfig = OmegaConf.to_object(cfg)
    with exit_on_error():
        if not job.run_dir:
            raise ConfigError("pass run_dir=<a run directory written by launch/train.py>")
        run_dirs = [Path(job.run_dir), *map(Path, job.compare)]
        missing = [d for d in run_dirs if not (d / "metrics.jsonl").is_file()]
        if missing:
            raise ConfigError(f"no metrics.jsonl in {', '.join(map(str, missing))}: not a run directory")
    default = run_dirs[0] / ("report_compare.png" if job.compare else "report.png")
    print(f"report: {render_report(run_dirs, Path(job.out) if job.out else default)}")


if __name__ == "__main__":
    register_configs()
    main()
