"""Real corpora on 2 CPU ranks through the deepspeed launcher, fp32: a store prepared ahead of training, and mixtures.

- ``launch/prepare.py`` (2 processes) writes the same store files as preparing inside a run (one process), and a
  run trains from ``data.prepared_path`` without preparing; a store prepared from other settings is refused, naming
  what differs.
- A mixture of five record shapes (the bundled messages data, the bundled alpaca sample up-sampled x2, and
  synthetic ShareGPT tool-use, OpenAI tool-calling and plain-text sources, formats detected) logs each source's
  format, passes the mask audit, logs the loss of each source per step and at eval, and a run stopped by SIGTERM
  and relaunched resumes bit-exact, per source too.
"""

import json
import random
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

    from dtrain.config import compose_job
    from dtrain.data.cache import load_or_prepare, store_folder
    from dtrain.data.prepare import prepare_job_store
    from dtrain.data.store import read_meta
    from dtrain.errors import DataError
    from dtrain.setup import load_renderer

    # The same settings but another max_seq_len: refused with what differs, before anything is written (in this
    # process: what launch/prepare.py runs; its exit code for a DataError, 2, is tests/unit/test_errors.py's).
    before = sorted((p.name, p.stat().st_mtime_ns) for p in store.iterdir())
    other = compose_job(overrides + [f"data.prepared_path={store}", "data.max_seq_len=128", f"output_dir={tmp_path / 'unused'}"])
    with pytest.raises(DataError, match=r"prepared from other settings \(they differ in: data\)"):
        prepare_job_store(other, progress=False)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in store.iterdir()) == before

    # Preparing inside a run (rank 0 with data.cache_dir, one process, in this process here) writes the same files.
    job = compose_job(overrides + [f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'unused'}"])
    renderer = load_renderer(job)
    in_run = load_or_prepare(job.data, renderer, job.train.seed, job.generate.num_prompts, is_local_main=True, barrier=lambda: None)
    cached = store_folder(job.data, renderer, job.train.seed, job.generate.num_prompts)
    assert len(in_run.train) == 3000 and cached.parent == tmp_path / "cache"
    for split in ("train", "eval"):  # every file's size and CRC-32
        assert read_meta(cached)[split]["files"] == read_meta(store)[split]["files"], split

    # Training reads the prepared store as it is (no preparation) on 2 ranks.
    out = launch_train(overrides + [f"data.prepared_path={store}", "data.cache_dir=null"], tmp_path / "from_store")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"token store {store} (prepared before)" in out.stdout and "preparing the token store" not in out.stdout
    assert len(steps_of(tmp_path / "from_store")) == 2


CITIES = ("paris", "oslo", "lima", "rome", "kyiv", "baku", "doha", "riga")
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    for name in ("weather", "time")
]
WORDS = ("alpha", "bravo", "delta", "echo", "golf", "hotel", "kilo", "lima", "mike", "oscar")


def write_agentic_sources(root, n: int = 40) -> None:
    """Synthetic ``sharegpt.jsonl`` (a system column, tools as a JSON string, ``function_call``/``observation``
    turns), ``tools.jsonl`` (OpenAI tool calling: two parallel calls with string arguments, two results, the answer)
    and ``text.jsonl`` (documents; the first longer than data.max_seq_len, cut into windows)."""
    rng = random.Random(0)
    with (root / "sharegpt.jsonl").open("w") as f:
        for _ in range(n):
            city, temp = rng.choice(CITIES), rng.randint(-5, 35)
            turns = [
                ("human", f"weather in {city}?"),
                ("function_call", json.dumps({"name": "weather", "arguments": {"city": city}})),
                ("observation", json.dumps({"temp": temp})),
                ("gpt", f"it is {temp} degrees"),
            ]
            record = {
                "system": "you can call tools",
                "tools": json.dumps(TOOLS),
                "conversations": [{"from": a, "value": v} for a, v in turns],
            }
            f.write(json.dumps(record) + "\n")
    with (root / "tools.jsonl").open("w") as f:
        for i in range(n):
            cities, hours = rng.sample(CITIES, 2), [rng.randint(0, 23) for _ in range(2)]
            calls = [
                {"id": f"call{i}_{k}", "type": "function", "function": {"name": "time", "arguments": json.dumps({"city": c})}}
                for k, c in enumerate(cities)
            ]
            messages = [
                {"role": "user", "content": f"time in {cities[0]} and {cities[1]}?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
            ]
            messages += [
                {"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"time": f"{h:02d}:00"})} for c, h in zip(calls, hours)
            ]
            messages.append({"role": "assistant", "content": f"{hours[0]:02d}:00 in {cities[0]}, {hours[1]:02d}:00 in {cities[1]}"})
            f.write(json.dumps({"tools": TOOLS, "messages": messages}) + "\n")
    with (root / "text.jsonl").open("w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(300 if i == 0 else 40))}) + "\n")


NAMES = ("chat", "alpaca", "sharegpt", "tools", "text")


def mixture_overrides(tiny_pretrained, root) -> list[str]:
    data = REPO_ROOT / "dtrain" / "assets" / "data"
    write_agentic_sources(root)
    sources = ", ".join(
        [
            f"{{path: {data / 'train.jsonl'}, name: chat, max_examples: 40}}",
            f"{{path: {data / 'alpaca_sample.jsonl'}, name: alpaca, format: alpaca, weight: 2}}",
            *(f"{{path: {root / name}.jsonl, name: {name}}}" for name in ("sharegpt", "tools", "text")),
        ]
    )
    return base(tiny_pretrained) + [
        "data.path=null",
        "data.eval_path=null",
        "data.eval_fraction=0.05",
        f"data.sources=[{sources}]",
        # A ChatML template that renders tools, tool calls and results (and plain chats as the tiny template does).
        f"data.chat_template={REPO_ROOT / 'dtrain' / 'assets' / 'tiny' / 'chat_template_tools.jinja'}",
        "data.max_seq_len=384",
        f"data.cache_dir={root / 'cache'}",  # prepared by the first launch, read by the other two
        "train.micro_batch_size=16",
        "train.max_steps=6",
        "train.eval_every=6",
        "ckpt.every_steps=0",
    ]


def test_a_mixture_of_record_shapes_logs_each_sources_loss_and_resumes_bit_exact(tmp_path, tiny_pretrained):
    overrides = mixture_overrides(tiny_pretrained, tmp_path)
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    out = launch_train(overrides, straight)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    formats = "chat: messages (detected), alpaca: alpaca, sharegpt: sharegpt (detected), tools: messages (detected), text: text (detected)"
    assert f"record formats: {formats}" in log
    assert "mask audit: 204 examples checked" in log
    # 5% of each source held out; an epoch draws each alpaca example twice; one text document became 5 windows.
    assert "chat: 38 train examples (2030 tokens), 2 eval; drawn 38" in log
    assert "alpaca: 48 train examples (1904 tokens), 2 eval; drawn 96" in log
    assert "sharegpt: 38 train examples (8198 tokens), 2 eval; drawn 38" in log
    assert "tools: 38 train examples (11553 tokens), 2 eval; drawn 38" in log
    assert "text: 42 train examples (9807 tokens), 2 eval; drawn 42" in log
    records = read_jsonl(straight / "metrics.jsonl")
    steps = steps_of(straight)
    assert len(steps) == 6
    for r in steps:  # every source in every step of 32; the step loss is the token-weighted mean of theirs (float32 sums: 1e-6)
        per_source = [r[f"loss/{name}"] for name in NAMES]
        assert min(per_source) * (1 - 1e-6) <= r["loss"] <= max(per_source) * (1 + 1e-6)
    (evaluation,) = [r for r in records if "eval_loss" in r]
    assert {f"eval_loss/{name}" for name in NAMES} <= set(evaluation)
    assert min(evaluation[f"eval_loss/{name}"] for name in NAMES) <= evaluation["eval_loss"]

    # SIGTERM on rank 1 at step 4: a checkpoint at step 4, exit 75; the relaunch resumes there and finishes.
    out = launch_train(overrides, chain, env={"DTRAIN_FAULT_SIGNAL": "4:1:TERM"})
    assert out.returncode == 75, out.stdout[-3000:] + out.stderr[-3000:]
    out = launch_train(overrides, chain)
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    resumed = {r["step"]: r for r in steps_of(chain)}
    exact = ("loss", "grad_norm", "lr", "tokens", "batch_fingerprint", *(f"loss/{name}" for name in NAMES))
    for r in steps[4:]:
        assert [resumed[r["step"]].get(k) for k in exact] == [r.get(k) for k in exact], r["step"]
