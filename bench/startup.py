"""Start-up of a short launch: DeepSpeed's Muon modules imported in every rank, or dtrain's stand-ins for them.

    .venv/bin/python bench/startup.py --repeats 3 --json startup.json

``deepspeed.initialize`` and the ZeRO optimizers import DeepSpeed's Muon modules whatever the optimizer; the import
applies ``torch.compile`` to Muon's kernels, which loads inductor. dtrain puts stand-ins in their place
(``dtrain.engine.stand_in_for_deepspeed_muon``); ``DTRAIN_REAL_DEEPSPEED_MUON=1`` keeps the real ones. The same
6-step job (2 ranks, ZeRO-2, fp32, the tiny model) runs alternately both ways, so the machine's drift falls on both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import finish, launch, ratio, table

RUN = ["+exp=tiny_cpu", "precision=fp32", "zero=zero2", "train.max_steps=6", "train.warmup_ratio=0"]
WAYS = {"real Muon modules": {"DTRAIN_REAL_DEEPSPEED_MUON": "1"}, "stand-ins (default)": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    walls: dict[str, list[float]] = {way: [] for way in WAYS}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for way, env in WAYS.items():
                figures = launch(way, RUN, Path(tmp) / f"{repeat}-{len(walls[way])}-{bool(env)}", num_gpus=2, extra_env=env)
                walls[way].append(figures.wall_s)
                if figures.exit_code:
                    failures.append({"name": way, "exit_code": figures.exit_code, "error": figures.error})
    real, stand_in = (statistics.median(walls[way]) for way in WAYS)
    rows = [{"name": way, "exit_code": 0, "median_wall_s": statistics.median(walls[way]), "walls_s": walls[way]} for way in WAYS]
    rows[1]["vs_real"] = ratio(stand_in, real)
    print(table(rows, [("name", "launch (6 steps)", ""), ("median_wall_s", "median wall s", ".1f"), ("vs_real", "x real", ".2f")]))
    finish("startup", args.json, 2, RUN, rows + failures)


if __name__ == "__main__":
    main()
