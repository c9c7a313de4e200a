"""Shared fixtures: the bundled tiny tokenizer, a saved tiny "pretrained" model, and a 2-rank launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtrain.dist import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_SCALE = float(os.environ.get("DTRAIN_TEST_TIMEOUT_SCALE", "1"))
"""Multiplies every launch's timeout: ``make test-precision-branches`` runs the bf16 branch on CPUs that emulate bf16
(several times slower), where the demo's 300 steps outlast the usual 10 minutes."""
TINY_DIR = REPO_ROOT / "dtrain" / "assets" / "tiny"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_DIR)


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> Path:
    """The bundled tiny config with fixed random weights saved as safetensors: a stand-in for a hub model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_pretrained")
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_DIR))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(TINY_DIR).save_pretrained(out)
    return out


def launch_train(
    overrides: list[str],
    run_dir: Path,
    num_ranks: int = 2,
    timeout: int = 600,
    env: dict[str, str] | None = None,
    via_command: bool = False,
    report: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``launch/train.py`` on ``num_ranks`` CPU ranks through DeepSpeed's launcher, for real; return the process.

    By default this runs DeepSpeed's per-node launcher (``python -m deepspeed.launcher.launch``, which spawns the
    ranks, sets their ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``, forwards signals and returns their exit code) with the
    command line the ``deepspeed`` command builds for one node. The ``deepspeed`` command itself only adds a second
    Python start-up in front of it (3-9 s a launch on this machine), so the tests whose subject is the user's command
    (the demo, the golden curve) pass ``via_command=True``. ``env`` adds variables (e.g. the ``DTRAIN_FAULT_*``
    injections of ``dtrain/faults.py``). ``report.png`` is drawn only where a test reads it (``report=True``): it
    adds 1-3 s to a launch.
    """
    script = ["launch/train.py", f"output_dir={run_dir}", *overrides, *([] if report else ["report=false"])]
    port = str(free_port())
    if via_command:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_ranks), "--master_port", port, *script]
    else:
        from deepspeed.launcher.runner import encode_world_info

        world = encode_world_info({"localhost": list(range(num_ranks))})
        launcher = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--master_addr=127.0.0.1"]
        cmd = [*launcher, f"--master_port={port}", "--log_level=info", *script]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout * TIMEOUT_SCALE)


def launch_two_nodes(
    overrides: list[str], run_dir: Path, hostfile: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> list[tuple[int, str]]:
    """Run a two-"node" job on this machine: two ``deepspeed --no_ssh`` launchers (``--num_nodes 2 --node_rank 0/1``,
    one rank each) that train together, as a two-host job would without ssh.

    ``hostfile`` is written (two names for this machine); returns each node's (exit code, stdout and stderr).
    """
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = free_port()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2"]
    rendezvous = ["--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    nodes = [
        subprocess.Popen(
            [*launcher, "--node_rank", str(rank), *rendezvous, "launch/train.py", f"output_dir={run_dir}", *overrides, "report=false"],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=timeout * TIMEOUT_SCALE)[0] for node in nodes]
    return [(node.returncode, log) for node, log in zip(nodes, logs)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


INTEGRATION_FILES_LONGEST_FIRST = (
    "test_train_launcher.py",
    "test_elastic_resume.py",
    "test_recovery.py",
    "test_tool_demo.py",
    "test_demo.py",
    "test_sequence_parallel.py",
    "test_corpora.py",
    "test_bench_smoke.py",
    "test_architectures.py",
    "test_qlora.py",
    "test_loss_invariance.py",
)
"""The integration files that take longest (a minute or more of launches each on the dev box), in that order; the
others follow in file order. ``make test`` hands whole files to two pytest-xdist workers in collection order, so the
long files start first and the short ones fill in at the end, where the two workers would otherwise wait on one."""


def run_order(item) -> tuple[int, int]:
    """Unit tests first; then the integration files longest first."""
    if "integration" not in item.keywords:
        return (0, 0)
    name = item.path.name
    rank = INTEGRATION_FILES_LONGEST_FIRST.index(name) if name in INTEGRATION_FILES_LONGEST_FIRST else len(INTEGRATION_FILES_LONGEST_FIRST)
    return (1, rank)


def pytest_collection_modifyitems(config, items):
    """Unit tests run first, so a broken change fails in the first minute, not after the launches.

    ``extended`` tests (another direction or layout of a feature the default suite covers) run with
    ``DTRAIN_EXTENDED=1`` only, to hold the default suite's time (``make test-extended`` runs everything)."""
    items.sort(key=run_order)  # stable: file order within each group
    if os.environ.get("DTRAIN_EXTENDED") == "1":
        return
    skip = pytest.mark.skip(reason="extended: set DTRAIN_EXTENDED=1 (make test-extended)")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)
