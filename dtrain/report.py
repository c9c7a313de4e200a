"""The run report: one PNG with the curves, memory plan vs measured, a summary and generation samples.

Written at the end of every run (``<run_dir>/report.png``) and by ``python launch/report.py run_dir=...``, which
also overlays several run directories for comparison. Reads only the run directory's files.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

from dtrain.disk import writing
from dtrain.metrics import PHASES, StepRecord, read_metrics

MiB = 2**20


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _series(records: list, value: Callable[[Any], Optional[float]]) -> tuple[list[int], list[float]]:
    points = [(r.step, value(r)) for r in records if value(r) is not None]
    return [p[0] for p in points], [p[1] for p in points]


PANELS: list[tuple[str, Callable[[StepRecord], Optional[float]], str]] = [
    ("loss", lambda r: r.loss, "train loss (token mean) and eval loss"),
    ("lr", lambda r: r.lr, "learning rate"),
    ("grad_norm", lambda r: r.grad_norm, "gradient norm (before clipping)"),
    ("tokens_per_s", lambda r: r.tokens_per_s, "trained tokens / s (all ranks)"),
    ("mfu", lambda r: r.mfu, "MFU"),
]


def render_report(run_dirs: list[Path], out: Path) -> Path:
    """Draw the report of ``run_dirs`` (the first one's summary, memory and samples; curves of all) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d), read_metrics(Path(d))) for d in run_dirs]
    fig, axes = plt.subplots(3, 3, figsize=(18, 13))
    for ax, (name, value, title) in zip([axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0], axes[1, 1]], PANELS):
        for run_dir, metrics in runs:
            steps, values = _series(metrics.steps, value)
            if values:
                ax.plot(steps, values, label=f"{run_dir.name}" + (" train" if name == "loss" else ""))
            if name == "loss":
                steps, values = _series(metrics.evals, lambda r: r.eval_loss)
                if values:
                    ax.plot(steps, values, "o--", label=f"{run_dir.name} eval")
        if name == "mfu" and not ax.lines:
            title = "TFLOP/s per device (MFU needs a known GPU peak)"
            for run_dir, metrics in runs:
                steps, values = _series(metrics.steps, lambda r: r.tflops_per_gpu)
                ax.plot(steps, values, label=run_dir.name)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if ax.lines:
            ax.legend(fontsize=8)
    _time_panel(axes[1, 2], runs[0][1].steps)
    _memory_panel(axes[2, 0], _read_json(runs[0][0] / "memory.json"))
    _text_panel(axes[2, 1], "summary", _summary_text(runs[0][0]))
    _text_panel(axes[2, 2], "generation samples (after training)", _samples_text(runs[0][0]))
    fig.suptitle(" vs ".join(str(d) for d, _ in runs), fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.tmp{out.suffix}")
    try:
        # Under a temporary name: a full disk leaves no half-drawn report.png behind.
        with writing(out, "the run report"):
            fig.savefig(tmp, dpi=80)
            tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def _time_panel(ax, records: list[StepRecord]) -> None:
    steps = [r for r in records if r.time_forward_s is not None]
    if steps:
        means = [sum(r.phase_seconds(p) or 0.0 for r in steps) / len(steps) for p in PHASES]
        ax.bar(PHASES, [1000 * m for m in means], color=["#999", "#4c72b0", "#dd8452", "#55a868"])
        ax.set_ylabel("ms per step (mean)")
    ax.set_title("where a step's time goes")


def _memory_panel(ax, memory: Optional[dict]) -> None:
    ax.set_title("memory per rank: plan vs measured (MiB)")
    if not memory:
        return
    plan, measured = memory["plan"], memory["measured_per_rank"][0]
    kinds = ("params", "optimizer")
    planned = [(plan["per_gpu_bytes"][k] + plan["per_rank_cpu_bytes"][k]) / MiB for k in kinds]
    got = [(measured[k] + measured.get(f"cpu_{k}", 0)) / MiB for k in kinds]
    x = range(len(kinds))
    ax.bar([i - 0.2 for i in x], planned, width=0.4, label="planned")
    ax.bar([i + 0.2 for i in x], got, width=0.4, label="measured (engine tensors)")
    ax.set_xticks(list(x), kinds)
    peak = measured.get("peak_cuda_allocated") or measured.get("peak_rss")
    ax.legend(fontsize=8, title=f"plan total {plan['per_gpu_bytes']['total'] / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB" if peak else None)


def _text_panel(ax, title: str, text: str) -> None:
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.0, 1.0, text, va="top", ha="left", family="monospace", fontsize=8, transform=ax.transAxes)


def _summary_text(run_dir: Path) -> str:
    summary = _read_json(run_dir / "summary.json") or {}
    keys = ("steps", "skipped_steps", "eval_loss", "accuracy_before", "accuracy_after", "padding_efficiency")
    lines = [f"{k}: {summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}: {summary.get(k)}" for k in keys if k in summary]
    return "\n".join(lines) or "(no summary.json yet)"


def _samples_text(run_dir: Path, n: int = 6) -> str:
    lines = []
    for s in _read_jsonl(run_dir / "samples.jsonl")[:n]:
        mark = "ok " if s.get("exact_match") else "BAD"
        prompt = textwrap.shorten(s["prompt"].replace("\n", " "), 48)
        lines.append(f"[{mark}] {prompt}\n      -> {textwrap.shorten(s['generated'], 40)!r}")
    return "\n".join(lines) or "(no samples.jsonl)"
