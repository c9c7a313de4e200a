"""dtrain vs TRL's SFTTrainer, side by side in one invocation: time per epoch and trained tokens/s, as ratios.

    .venv/bin/python bench/vs_trl.py --steps 30 --json vs_trl.json           # bf16, ZeRO-2, 2 ranks (needs dtrain[bench])
    .venv/bin/python bench/vs_trl.py --smoke --json /tmp/smoke.json          # 3 steps on a 400-example slice

One after the other, each through the ``deepspeed`` launcher with 2 ranks (CPU ranks on gloo without a GPU):

1. dtrain: ``launch/train.py +exp=tiny_cpu`` on the saved model (``--model``, or the bundled tiny config with seed
   1234 weights, saved in a temporary folder), padded batches (no packing, no length grouping), no eval, no
   generation check, ``--steps`` optimizer steps;
2. TRL: ``bench/trl_sft.py`` with the ``ds_config.json`` dtrain wrote, the same model, data file, sequence length,
   micro-batch x accumulation x ranks, steps, learning-rate schedule and data order (so each step trains the same
   examples: ``same_batches`` checks the per-step token counts), with ``assistant_only_loss`` masks checked equal to
   dtrain's.

Time per step is the wall time from one optimizer step's end to the next (for dtrain from rank 0's ``train.log``
timestamps, millisecond resolution; for TRL from a ``TrainerCallback``), averaged over the steps after the first
``--warmup`` ones; it includes data collation, logging and every per-step collective. The in-step time (dtrain's
``step_time_s``, TRL's ``on_step_begin`` -> ``on_step_end``) is in the JSON too. Trained tokens/s = trained (loss)
tokens of those steps / their time. Time per epoch = time per step x steps per epoch (examples // global batch).
Start-up (imports, tokenisation, engine set-up) and the end of the run (dtrain's checkpoint, export and report) are
not in either number; each launch's whole wall time is in the JSON as ``launch_wall_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from dtrain.dist import free_port
from dtrain.metrics import read_metrics

from common import REPO_ROOT, machine, make_tiny_pretrained

BUNDLED_DATA = REPO_ROOT / "dtrain" / "assets" / "data" / "train.jsonl"
SMOKE = dict(steps=3, micro_batch=4, grad_accum=2, warmup=1, examples=400)
STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO step (\d+)/\d+ loss ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per framework")
    p.add_argument("--micro-batch", type=int, default=16, help="examples per rank per forward")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero", default="zero2", help="a conf/zero name (zero1, zero2, zero3, ...)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--model", default=None, help="a saved model + tokenizer; default: the tiny config, seed 1234 weights")
    p.add_argument("--data", default=str(BUNDLED_DATA), help="messages JSONL (default: dtrain's bundled train.jsonl)")
    p.add_argument("--examples", type=int, default=None, help="train on the first N records of --data only")
    p.add_argument("--workdir", default=None, help="keep both runs here (default: a temporary folder, removed)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE['steps']} steps, micro-batch {SMOKE['micro_batch']} x accumulation {SMOKE['grad_accum']}, "
        f"first {SMOKE['examples']} records: checks the pipeline, not the speed",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.micro_batch, args.grad_accum = SMOKE["steps"], SMOKE["micro_batch"], SMOKE["grad_accum"]
        args.warmup, args.examples = SMOKE["warmup"], args.examples or SMOKE["examples"]
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} must exceed --warmup {args.warmup} (the warm-up steps are not timed)")
    return args


def run_launch(cmd: list[str], log_path: Path, timeout: int) -> float:
    """Run one deepspeed launch in its own process group, output to ``log_path``; its wall time.

    Raises:
        RuntimeError: on a non-zero exit or a timeout (the whole group is killed), with the log's tail.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks
            proc.wait()
            code = None
    wall = time.perf_counter() - t0
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        what = f"timed out after {timeout} s" if code is None else f"exited with {code}"
        raise RuntimeError(f"{' '.join(cmd[:6])} ... {what}; log {log_path}:\n{tail}")
    return wall


def deepspeed_cmd(ranks: int, script: str) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), script]


def dtrain_steps(run_dir: Path) -> list[dict]:
    """Per step: loss, trained/input tokens, in-step time, and the step-end to step-end wall time from train.log."""
    ends = {}
    for line in (run_dir / "train.log").read_text().splitlines():
        m = STEP_LINE.match(line)
        if m:
            ends[int(m.group(2))] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    rows = []
    for r in read_metrics(run_dir).steps:
        interval = ends[r.step] - ends[r.step - 1] if r.step in ends and r.step - 1 in ends else None
        rows.append(
            {
                "step": r.step,
                "loss": r.loss,
                "grad_norm": r.grad_norm,
                "trained_tokens": r.tokens,
                "input_tokens": r.input_tokens,
                "in_step_time_s": r.step_time_s,
                "step_time_s": interval if interval is not None else r.step_time_s,
            }
        )
    return rows


def trl_steps(metrics: dict) -> list[dict]:
    return [
        {
            "step": r["step"],
            "loss": r.get("loss"),
            "grad_norm": r.get("grad_norm"),
            "trained_tokens": r["trained_tokens"],
            "input_tokens": r["input_tokens"],
            "in_step_time_s": r["compute_time_s"],
            "step_time_s": r["step_time_s"],
        }
        for r in metrics["per_step"]
    ]


def summarise(rows: list[dict], warmup: int, steps_per_epoch: int, launch_wall: float) -> dict:
    timed = rows[warmup:]
    seconds = sum(r["step_time_s"] for r in timed)
    per_step = seconds / len(timed)
    return {
        "steps": len(rows),
        "timed_steps": len(timed),
        "step_time_s": per_step,
        "in_step_time_s": sum(r["in_step_time_s"] for r in timed) / len(timed),
        "trained_tokens_per_s": sum(r["trained_tokens"] for r in timed) / seconds,
        "epoch_time_s": per_step * steps_per_epoch,
        "first_loss": rows[0]["loss"],
        "final_loss": rows[-1]["loss"],
        "trained_tokens_total": sum(r["trained_tokens"] for r in rows),
        "launch_wall_s": launch_wall,
        "per_step": rows,
    }


def format_table(results: dict) -> str:
    head = f"{'framework':<9} {'steps':>5} {'s/step':>8} {'in-step s':>9} {'trained tok/s':>13} {'s/epoch':>8} {'final loss':>10}"
    lines = [head, "-" * len(head)]
    for name in ("dtrain", "trl"):
        r = results[name]
        lines.append(
            f"{name:<9} {r['steps']:>5} {r['step_time_s']:>8.3f} {r['in_step_time_s']:>9.3f} "
            f"{r['trained_tokens_per_s']:>13.0f} {r['epoch_time_s']:>8.1f} {r['final_loss']:>10.4f}"
        )
    ratios = results["ratios"]
    lines.append(f"dtrain/TRL: time per epoch {ratios['time_per_epoch']:.3f}x, trained tokens/s {ratios['trained_tokens_per_s']:.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dtrain-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    finished = False
    try:
        model = Path(args.model) if args.model else make_tiny_pretrained(workdir / "model")
        data = Path(args.data).resolve()
        if args.examples:  # the same slice for both frameworks
            lines = [line for line in data.read_text().splitlines() if line.strip()][: args.examples]
            data = workdir / "data.jsonl"
            data.write_text("\n".join(lines) + "\n")

        run_dir = workdir / "dtrain"
        overrides = [
            "+exp=tiny_cpu",
            f"output_dir={run_dir}",
            f"model.path={model}",
            "model.init=pretrained",
            f"zero={args.zero}",
            f"precision={args.precision}",
            f"train.max_steps={args.steps}",
            f"train.micro_batch_size={args.micro_batch}",
            f"train.grad_accum_steps={args.grad_accum}",
            f"data.path={data}",
            "data.eval_path=null",
            "data.eval_fraction=0",
            f"data.max_seq_len={args.max_seq_len}",
            "data.packing=false",
            "data.group_by_length=none",
            "data.cache_dir=",
            "train.eval_every=0",
            "train.log_every=1",
            "generate.num_prompts=0",
            "generate.before_training=false",
            "export.verify=none",
            "ckpt.resume=never",
        ]
        print(
            f"[vs_trl] dtrain: {args.steps} steps, {args.micro_batch} x {args.grad_accum} x {args.ranks} ranks, "
            f"{args.zero}, {args.precision} -> {run_dir}",
            flush=True,
        )
        dtrain_wall = run_launch(deepspeed_cmd(args.ranks, "launch/train.py") + overrides, workdir / "dtrain.log", args.timeout)

        import yaml

        train_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
        trl_out = workdir / "trl"
        trl_args = [
            "--ds-config",
            str(run_dir / "ds_config.json"),
            "--model",
            str(model),
            "--data",
            str(data),
            "--max-seq-len",
            str(args.max_seq_len),
            "--micro-batch",
            str(args.micro_batch),
            "--grad-accum",
            str(args.grad_accum),
            "--steps",
            str(args.steps),
            "--lr",
            str(train_cfg["lr"]),
            "--seed",
            str(train_cfg["seed"]),
            "--warmup-ratio",
            str(train_cfg["warmup_ratio"]),
            "--min-lr-ratio",
            str(train_cfg["min_lr_ratio"]),
            "--schedule",
            str(train_cfg["schedule"]),
            "--out",
            str(trl_out),
        ]
        print(f"[vs_trl] TRL SFTTrainer: same ds_config.json, model, data, batch, steps -> {trl_out}", flush=True)
        trl_wall = run_launch(deepspeed_cmd(args.ranks, "bench/trl_sft.py") + trl_args, workdir / "trl.log", args.timeout)
        trl_metrics = json.loads((trl_out / "trl_metrics.json").read_text())

        global_batch = args.micro_batch * args.grad_accum * args.ranks
        steps_per_epoch = trl_metrics["examples"] // global_batch
        d_rows, t_rows = dtrain_steps(run_dir), trl_steps(trl_metrics)
        results = {
            "config": {
                "steps": args.steps,
                "micro_batch": args.micro_batch,
                "grad_accum": args.grad_accum,
                "ranks": args.ranks,
                "global_batch": global_batch,
                "zero": args.zero,
                "precision": args.precision,
                "max_seq_len": args.max_seq_len,
                "warmup_steps_not_timed": args.warmup,
                "examples": trl_metrics["examples"],
                "steps_per_epoch": steps_per_epoch,
                "data": str(data),
                "model": str(model),
                "smoke": args.smoke,
                "threads_per_rank_trl": trl_metrics["threads_per_rank"],
                "versions": trl_metrics["versions"],
                "machine": machine(),
            },
            "dtrain": summarise(d_rows, args.warmup, steps_per_epoch, dtrain_wall),
            "trl": summarise(t_rows, args.warmup, steps_per_epoch, trl_wall),
            "mask_check": {k: v for k, v in trl_metrics["mask_check"].items() if k != "first_difference" or v is not None},
            # Same examples in every step <=> the same trained and input token counts per step (checked, not assumed).
            "same_batches": [(r["trained_tokens"], r["input_tokens"]) for r in d_rows]
            == [(r["trained_tokens"], r["input_tokens"]) for r in t_rows],
        }
        d, t = results["dtrain"], results["trl"]
        results["ratios"] = {
            "time_per_epoch": d["epoch_time_s"] / t["epoch_time_s"],
            "trained_tokens_per_s": d["trained_tokens_per_s"] / t["trained_tokens_per_s"],
        }
        results["first_loss_rel_diff"] = abs(d["first_loss"] - t["first_loss"]) / abs(t["first_loss"])
        print(format_table(results))
        mc = results["mask_check"]
        print(
            f"same batches in every step: {results['same_batches']}; TRL masks equal to dtrain's on "
            f"{mc['labels_equal']}/{mc['examples']} examples; first-step loss {d['first_loss']:.4f} vs {t['first_loss']:.4f}"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
            print(f"wrote {args.json}")
        finished = True
        return results
    finally:
        if args.workdir:
            pass
        elif finished:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"[vs_trl] kept {workdir} (logs of the failed run)", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        sys.exit(f"bench/vs_trl.py: {e}")
