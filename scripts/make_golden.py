"""Record the golden loss curve of the embedded default (fp32, 2 CPU ranks) that tests/integration/test_golden.py checks.

    .venv/bin/python scripts/make_golden.py          # rewrites tests/golden/tiny_cpu_fp32.json

Only for a change that is meant to change training (say so in the commit): a restructuring must leave the curve as
it is. The sample ids (absolute paths) are not recorded, so the file does not depend on where the repo lives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN = REPO_ROOT / "tests" / "golden" / "tiny_cpu_fp32.json"
OVERRIDES = [
    "+exp=tiny_cpu",
    "precision=fp32",
    "train.max_steps=40",
    "train.log_every=10",
    "train.eval_every=20",
    "generate.num_prompts=0",
    "generate.before_training=false",
]
STEP_FIELDS = ("step", "loss", "grad_norm", "lr", "tokens", "input_tokens")
NUM_RANKS = 2


def main() -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from dtrain.dist import free_port
    from dtrain.metrics import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(NUM_RANKS),
            "--master_port",
            str(free_port()),
            "launch/train.py",
            f"output_dir={tmp}/run",
            *OVERRIDES,
        ]
        subprocess.run(cmd, cwd=REPO_ROOT, check=True, env={**os.environ, "WANDB_MODE": "disabled"})
        metrics = read_metrics(Path(tmp) / "run")
    previous = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    golden = {
        "about": previous.get("about", "The embedded default's loss curve in fp32 on 2 CPU ranks."),
        "overrides": OVERRIDES,
        "num_ranks": NUM_RANKS,
        "steps": [{k: getattr(r, k) for k in STEP_FIELDS} for r in metrics.steps],
        "evals": [{"step": r.step, "eval_loss": r.eval_loss, "eval_tokens": r.eval_tokens} for r in metrics.evals],
    }
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {len(golden['steps'])} steps, final loss {golden['steps'][-1]['loss']:.6f}")


if __name__ == "__main__":
    main()
