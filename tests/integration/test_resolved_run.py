"""What a run resolves is what it records and what it resumes with; outputs work on examples longer than any cut-off.

Two bugs this guards against: ``config.yaml`` recorded ``data.packing: null`` whatever the run decided, so a resume
with the value that actually ran (``data.packing=true``) was refused; and the export probe cut long eval examples
into a non-contiguous slice that safetensors refused, killing the run after training.
"""

import json
import random

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dtrain.config import load_run_config
from dtrain.metrics import read_metrics
from dtrain.outputs import PROBE_TOKENS

from tests.conftest import launch_train

pytestmark = pytest.mark.integration

QUIET = ["generate.num_prompts=0", "generate.before_training=false", "train.eval_every=0", "export.verify=none"]


def test_config_yaml_records_the_packing_decision_and_resumes_with_it(tmp_path):
    run_dir = tmp_path / "run"
    first = launch_train(["+exp=tiny_cpu", "precision=fp32", "data.packing=null", "train.max_steps=2", *QUIET], run_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "data.packing=null: padded micro-batches in shuffled order would hold" in first.stdout
    assert OmegaConf.load(run_dir / "config.yaml").data.packing is True  # the bundled lengths are mixed: packed
    assert load_run_config(run_dir).data.packing is True

    # The value that ran, given explicitly, continues the same run (it was refused before): the checkpoint's key
    # holds the decision, not the null asked for. The other value is refused with the setting named: the unit test
    # test_checkpoint.py::test_a_layout_change_is_refused_under_reshard_never_and_a_global_batch_or_packing_change_always.
    again = launch_train(["+exp=tiny_cpu", "precision=fp32", "data.packing=true", "train.max_steps=3", *QUIET], run_dir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and "step 2" in again.stdout
    assert [r.step for r in read_metrics(run_dir).steps] == [1, 2, 3]


def long_chats(n: int, seed: int) -> list[dict]:
    """Chats whose answers are 300-460 characters: over 256 tokens under the byte-level tokenizer."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    chats = []
    for i in range(n):
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(55, 75)))
        chats.append({"messages": [{"role": "user", "content": f"recite {i}"}, {"role": "assistant", "content": answer}]})
    return chats


def test_outputs_of_a_run_whose_eval_examples_are_longer_than_the_probe(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, n, seed in (("train.jsonl", 48, 0), ("eval.jsonl", 6, 1)):
        (data / name).write_text("".join(json.dumps(c) + "\n" for c in long_chats(n, seed)))
    run_dir = tmp_path / "run"
    out = launch_train(
        [
            "+exp=tiny_cpu",
            "precision=fp32",
            "zero=zero3",
            f"data.path={data / 'train.jsonl'}",
            f"data.eval_path={data / 'eval.jsonl'}",
            "data.max_seq_len=512",
            "data.packing=false",
            "train.max_steps=3",
            "train.micro_batch_size=2",
            "generate.num_prompts=2",
            "generate.max_new_tokens=8",
            "generate.before_training=false",
            "export.verify=logits",
        ],
        run_dir,
        report=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    probe = load_file(str(run_dir / "probe.safetensors"))
    assert tuple(probe["input_ids"].shape) == (2, PROBE_TOKENS) and probe["logits"].shape[1] == PROBE_TOKENS
    assert "reloaded logits match the engine's" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["num_prompts"] == 2 and summary["eval_loss"] > 0
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 2
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert json.loads((run_dir / "memory.json").read_text())["plan"]["zero"] == 3
    steps = read_metrics(run_dir).steps
    assert len(steps) == 3 and all(r.input_tokens > 2 * 300 for r in steps)  # the long examples were trained
