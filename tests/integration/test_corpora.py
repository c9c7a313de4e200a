"""Real corpora on 2 CPU ranks through the deepspeed launcher, fp32: a store prepared ahead of training, and mixtures.

- ``launch/prepare.py`` then training from ``data.prepared_path`` gives the same steps (losses, tokens, examples)
  as preparing inside the run; a store prepared from other settings is refused, naming what differs.
- A two-source mixture (the bundled messages data, and the bundled alpaca sample up-sampled x2) logs the loss of
  each source per step and at eval, and a run stopped and resumed mid-way is bit-exact, per source too.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, launch_train, read_jsonl

pytestmark = pytest.mark.integration


def base(tiny_pretrained) -> list[str]:
    return [
        "+exp=tiny_cpu",
        f"model.path={tiny_pretrained}",
        "model.init=pretrained",
        "precision=fp32",
        "zero=zero2",
        "train.warmup_ratio=0",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=1",
        "generate.num_prompts=0",
        "generate.before_training=false",
        "data.max_seq_len=256",
    ]


def prepare(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/prepare.py", *overrides], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def steps_of(run_dir) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_prepare_then_train_matches_preparing_in_the_run(tmp_path, tiny_pretrained):
    overrides = base(tiny_pretrained) + ["train.max_steps=2", "train.eval_every=0"]
    store = tmp_path / "store"
    out = prepare(overrides + [f"data.prepared_path={store}", "data.num_proc=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert summary["train"]["examples"] == 3000 and summary["eval"]["examples"] == 200 and summary["prepare"]["num_proc"] == 2
    assert (store / "train.ids").stat().st_size == 4 * summary["train"]["tokens"]

    # The same settings but another max_seq_len: refused with what differs, before anything is written.
    other = prepare(overrides + [f"data.prepared_path={store}", "data.max_seq_len=128"])
    assert other.returncode == 2 and "prepared from other settings (they differ in: data)" in other.stderr

    in_run, from_store = tmp_path / "in_run", tmp_path / "from_store"
    out = launch_train(overrides + [f"data.cache_dir={tmp_path / 'cache'}"], in_run)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "preparing the token store" in out.stdout
    out = launch_train(overrides + [f"data.prepared_path={store}", "data.cache_dir=null"], from_store)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"token store {store} (prepared before)" in out.stdout and "preparing the token store" not in out.stdout
    ref, got = steps_of(in_run), steps_of(from_store)
    assert len(ref) == 2
    for a, b in zip(ref, got):
        assert (a["loss"], a["grad_norm"], a["tokens"], a["batch_fingerprint"]) == (
            b["loss"],
            b["grad_norm"],
            b["tokens"],
            b["batch_fingerprint"],
        )


def mixture_overrides(tiny_pretrained) -> list[str]:
    data = REPO_ROOT / "dtrain" / "assets" / "data"
    sources = (
        f"[{{path: {data / 'train.jsonl'}, name: chat}}, {{path: {data / 'alpaca_sample.jsonl'}, name: alpaca, format: alpaca, weight: 2}}]"
    )
    return base(tiny_pretrained) + [
        "data.path=null",
        "data.eval_path=null",
        "data.eval_fraction=0.05",
        f"data.sources={sources}",
        "data.cache_dir=null",
        "train.max_steps=6",
        "train.eval_every=6",
        "ckpt.every_steps=0",
    ]


def test_a_mixture_logs_each_sources_loss_and_resumes_bit_exact(tmp_path, tiny_pretrained):
    overrides = mixture_overrides(tiny_pretrained)
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    out = launch_train(overrides, straight)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # 2850 + 48 prepared (5% of each source held out); an epoch draws each alpaca example twice.
    log = out.stdout + out.stderr
    assert "chat: 2850 train examples (146434 tokens), 150 eval; drawn 2850" in log
    assert "alpaca: 48 train examples (1904 tokens), 2 eval; drawn 96" in log
    records = read_jsonl(straight / "metrics.jsonl")
    steps = steps_of(straight)
    assert len(steps) == 6 and all("loss/chat" in r for r in steps)
    for r in steps:  # the step loss is the token-weighted mean of the sources' losses (float32 sums: 1e-6)
        per_source = [r[k] for k in ("loss/chat", "loss/alpaca") if k in r]
        assert min(per_source) * (1 - 1e-6) <= r["loss"] <= max(per_source) * (1 + 1e-6)
    assert any("loss/alpaca" in r for r in steps)
    (evaluation,) = [r for r in records if "eval_loss" in r]
    assert {"eval_loss/chat", "eval_loss/alpaca"} <= set(evaluation)
    assert min(evaluation["eval_loss/chat"], evaluation["eval_loss/alpaca"]) <= evaluation["eval_loss"]

    # SIGTERM on rank 1 at step 4: a checkpoint at step 4, exit 75; the relaunch resumes there and finishes.
    out = launch_train(overrides, chain, env={"DTRAIN_FAULT_SIGNAL": "4:1:TERM"})
    assert out.returncode == 75, out.stdout[-3000:] + out.stderr[-3000:]
    out = launch_train(overrides, chain)
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    resumed = {r["step"]: r for r in steps_of(chain)}
    exact = ("loss", "grad_norm", "lr", "tokens", "batch_fingerprint", "loss/chat", "loss/alpaca")
    for r in steps[4:]:
        assert [resumed[r["step"]].get(k) for k in exact] == [r.get(k) for k in exact], r["step"]
