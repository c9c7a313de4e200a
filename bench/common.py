"""What the benchmark scripts share: a real ``deepspeed`` launch of ``launch/train.py``, its figures, a table.

Each benchmark runs whole training jobs through the same launcher users run, one after another (never two at
once: they would share the machine), and reads what the job wrote to its run directory (``metrics.jsonl``,
``summary.json``, ``memory.json``, ``train.log``). Figures from one invocation are comparable with each other;
across invocations only their ratios are (shared machines are noisy).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from dtrain.metrics import PHASES, read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every run: no generation check, no periodic eval, no export check: only the training steps are measured.
QUIET = ["generate.num_prompts=0", "generate.before_training=false", "train.eval_every=0", "export.verify=none", "report=false"]


@dataclass
class RunFigures:
    """One training job's figures (mean over the steps after ``warmup`` ones)."""

    name: str
    exit_code: int
    steps: int = 0
    step_time_s: Optional[float] = None
    trained_tokens_per_s: Optional[float] = None
    input_tokens_per_s: Optional[float] = None
    padding_efficiency: Optional[float] = None
    tflops_per_gpu: Optional[float] = None
    mfu: Optional[float] = None
    steps_per_epoch: Optional[int] = None
    epoch_time_s: Optional[float] = None
    final_loss: Optional[float] = None
    wall_s: float = 0.0
    phases_s: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    run_dir: str = ""
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def launch(
    name: str, overrides: list[str], run_dir: Path, num_gpus: int, warmup: int = 1, extra_env: Optional[dict] = None, timeout_s: int = 3600
) -> RunFigures:
    """Run ``deepspeed --num_gpus N launch/train.py <overrides>`` and read its figures from the run directory."""
    from dtrain.dist import free_port

    port = free_port()
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [
        str(deepspeed),
        "--num_gpus",
        str(num_gpus),
        "--master_port",
        str(port),
        "launch/train.py",
        f"output_dir={run_dir}",
        *QUIET,
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), **(extra_env or {})}
    print(f"[bench] {name}: {' '.join(cmd[5:])}", flush=True)
    started = time.monotonic()
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    figures = read_run(name, run_dir, warmup)
    figures.exit_code, figures.wall_s = out.returncode, time.monotonic() - started
    if out.returncode != 0:
        lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        figures.error = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        print(f"[bench] {name} failed (exit {out.returncode}): {figures.error}", flush=True)
    return figures


def read_run(name: str, run_dir: Path, warmup: int = 1) -> RunFigures:
    """The figures of a finished (or failed) run directory; steps before ``warmup`` are left out of the means."""
    figures = RunFigures(name=name, exit_code=0, run_dir=str(run_dir))
    steps = read_metrics(run_dir).steps
    if not steps:
        return figures
    timed = steps[warmup:] or steps
    figures.steps = len(steps)
    figures.step_time_s = statistics.fmean(r.step_time_s for r in timed)
    seconds = sum(r.step_time_s for r in timed)
    figures.trained_tokens_per_s = sum(r.tokens for r in timed) / seconds
    figures.input_tokens_per_s = sum(r.input_tokens for r in timed) / seconds
    figures.padding_efficiency = sum(r.input_tokens for r in timed) / sum(r.input_tokens / r.padding_efficiency for r in timed)
    figures.tflops_per_gpu = statistics.fmean(r.tflops_per_gpu for r in timed)
    mfus = [r.mfu for r in timed if r.mfu is not None]
    figures.mfu = statistics.fmean(mfus) if mfus else None
    figures.final_loss = steps[-1].loss
    figures.phases_s = {phase: statistics.fmean(r.phase_seconds(phase) or 0.0 for r in timed) for phase in PHASES}
    log = run_dir / "train.log"
    match = re.search(r"(\d+) steps/epoch", log.read_text()) if log.is_file() else None
    if match:
        figures.steps_per_epoch = int(match.group(1))
        figures.epoch_time_s = figures.step_time_s * figures.steps_per_epoch
    memory = run_dir / "memory.json"
    if memory.is_file():
        figures.memory = json.loads(memory.read_text())
    return figures


def make_tiny_pretrained(folder: Path) -> Path:
    """The bundled tiny config with fixed random weights, saved like a hub model (as the tests' fixture does)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tiny = REPO_ROOT / "dtrain" / "assets" / "tiny"
    if not (folder / "config.json").is_file():
        torch.manual_seed(1234)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny)).save_pretrained(folder, safe_serialization=True)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return folder


SHAPES = ("llama3_1b", "llama3_3b", "llama3_8b", "llama2_7b", "llama2_13b")


def shape_model(shape: str, folder: Path, save_weights: bool = False) -> list[str]:
    """Overrides that train a published model shape with random weights: its bundled config.json plus the tiny
    tokenizer (every id it makes fits any of these vocabularies) in ``folder``. Speed does not depend on weights.

    Args:
        save_weights: Also write random bf16 weights there and load them (``model.init=pretrained``): adapters
            (``peft=lora``) need a base that exists on disk.
    """
    import shutil

    if shape not in SHAPES and shape != "tiny":
        raise SystemExit(f"--shape {shape}: use one of {', '.join(SHAPES)} (or tiny, for a rehearsal on CPU)")
    folder.mkdir(parents=True, exist_ok=True)
    config = REPO_ROOT / "dtrain" / "assets" / ("tiny" if shape == "tiny" else f"configs/{shape}") / "config.json"
    shutil.copy(config, folder / "config.json")
    tiny = REPO_ROOT / "dtrain" / "assets" / "tiny"
    for f in tiny.iterdir():
        if f.name != "config.json":
            shutil.copy(f, folder / f.name)
    if save_weights:
        save_random_weights(folder)
        return [f"model.path={folder}", "model.init=pretrained"]
    return [f"model.path={folder}", "model.init=random"]


def save_random_weights(folder: Path) -> None:
    """Random bf16 weights for ``folder/config.json``, saved as safetensors. Built on the GPU when there is one
    (an 8B model initialises in seconds there, minutes on CPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_model(overrides: list[str], shape: Optional[str], folder: Path, save_weights: bool = False) -> list[str]:
    """The overrides plus the model to benchmark: a published ``shape`` with random weights (saved to ``folder``
    with ``save_weights``), else random weights of the exp's own model unless the overrides name one."""
    if shape:
        return [*overrides, *shape_model(shape, folder, save_weights)]
    if any(o.startswith(("model.init=", "model.path=")) for o in overrides):
        return overrides
    return [*overrides, "model.init=random"]


def finish(
    bench: str, json_path: Optional[str], num_gpus: int, overrides: list[str], rows: list[dict[str, Any]], name_key: str = "name"
) -> None:
    """Write the JSON record of a benchmark and exit non-zero naming the runs that failed."""
    write_json(json_path, {"bench": bench, "machine": machine(), "num_gpus": num_gpus, "overrides": overrides, "runs": rows})
    failed = [f"{r[name_key]} ({r.get('error', '')})" for r in rows if r["exit_code"] != 0]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not spec:
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return format(value, spec)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, header, format spec)."""
    cells = [[header for _, header, _ in columns]] + [[fmt(r.get(key), spec) for key, _, spec in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths))) for line in cells)


def write_json(path: Optional[str], payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"[bench] wrote {path}")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def machine() -> str:
    """The device these figures were taken on, for the record."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"CPU ({os.cpu_count()} cores)"
