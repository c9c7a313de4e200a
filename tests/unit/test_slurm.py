"""launch/slurm/train.sbatch against a fake SLURM: the commands it runs, the environment the ranks get, requeue.

    .venv/bin/python -m pytest tests/unit/test_slurm.py

No SLURM needed: `srun`, `scontrol`, `scancel`, `nvidia-smi` and `deepspeed` are bash scripts put first on PATH that
log what they were given. The fake `srun` runs its command once per node (SLURM_NODEID=0, 1) in a process group of
its own, as SLURM tracks a step, and exits with the highest task exit code, as `srun` does; the fake `scancel`
signals every process of those groups. The fake `deepspeed` exits with a code the test picks, or starts one fake
rank (Python, handling SIGUSR1 like dtrain/preemption.py) and exits with its code, as the launcher does. The last
test feeds the rendered command to DeepSpeed's real launcher code with process creation mocked out.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="launch/slurm/train.sbatch is a bash script; bash is not installed")

JOB_ID = "4242"
MASTER_PORT = str(10000 + int(JOB_ID) % 20000)
OVERRIDES = ["+exp=7b_zero3", "train.lr=1e-4", "data.files=[a,b]", "model.path=/models/My Model"]

FAKE_SCONTROL = r"""#!/bin/bash
printf '%s\n' "$*" >>"$FAKE_LOG/scontrol.log"
case "$1" in
show)
    case "$3" in
    "node[01-02]") printf '%s\n' node01 node02 ;;
    *) tr ',' '\n' <<<"$3" ;;
    esac ;;
requeue) ;;
*) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""

FAKE_SRUN = r"""#!/bin/bash
printf '%s\0' "$@" >"$FAKE_LOG/srun.argv"
export_mode=ALL
while [[ $# -gt 0 && "$1" == -* ]]; do
    case "$1" in --export=*) export_mode=${1#--export=} ;; esac
    shift
done
if [[ "$export_mode" == ALL ]]; then
    envcmd=(env)
else  # NONE or a list: only the named variables (and SLURM's own) reach the tasks
    envcmd=(env -i "PATH=$PATH")
    for var in $(compgen -e); do
        if [[ "$var" == SLURM_* || "$var" == FAKE_* || ",$export_mode," == *",$var,"* ]]; then
            envcmd+=("$var=${!var}")
        fi
    done
fi
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    "${envcmd[@]}" SLURM_NODEID=$node SLURM_PROCID=$node setsid "$@" &
    pids+=($!)
    echo $! >>"$FAKE_LOG/step.pgids"
done
rc=0
for pid in "${pids[@]}"; do
    wait "$pid"
    status=$?
    ((status > rc)) && rc=$status
done
exit $rc
"""

FAKE_SCANCEL = r"""#!/bin/bash
printf '%s\n' "$*" >>"$FAKE_LOG/scancel.log"
sig=KILL
for arg; do
    case "$arg" in
    --signal=*) sig=${arg#--signal=} ;;
    -b | --batch | -f | --full) echo "fake scancel: $arg not emulated" >&2; exit 1 ;;
    esac
done
# Without --batch/--full, SLURM signals every process of every step of the job, not the batch script.
while read -r pgid; do kill -s "$sig" -- "-$pgid" 2>/dev/null; done <"$FAKE_LOG/step.pgids"
exit 0
"""

FAKE_NVIDIA_SMI = r"""#!/bin/bash
printf '%s\n' "$*" >>"$FAKE_LOG/nvidia-smi.log"
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000001)"
"""

FAKE_DEEPSPEED = r"""#!/bin/bash
node=$SLURM_NODEID
printf '%s\0' "$@" >"$FAKE_LOG/deepspeed.$node.argv"
env -0 >"$FAKE_LOG/deepspeed.$node.env"
while [[ $# -gt 0 ]]; do
    [[ "$1" == --hostfile ]] && cp "$2" "$FAKE_LOG/hostfile.$node"
    shift
done
if [[ -n "${FAKE_RANK:-}" ]]; then  # like the launcher: start the rank, exit with its code
    "$FAKE_PYTHON" "$FAKE_RANK" &
    wait $!
    exit $?
fi
codes=($FAKE_EXIT)
exit "${codes[$node]:-${codes[0]}}"
"""

FAKE_RANK = r"""import os, signal, sys, time
from pathlib import Path

log, node = Path(os.environ["FAKE_LOG"]), os.environ["SLURM_NODEID"]
inherited = signal.getsignal(signal.SIGUSR1)


def stop(signum, frame):  # dtrain.preemption: flag, checkpoint at the next step, exit 75
    (log / f"rank.{node}.signal").write_text(signal.Signals(signum).name)
    sys.exit(75)


signal.signal(signal.SIGUSR1, stop)
(log / f"rank.{node}.ready").write_text("ignored" if inherited == signal.SIG_IGN else str(inherited))
time.sleep(30)
sys.exit(1)
"""


class FakeSlurm:
    """A bin directory of fakes, a log directory, and the environment of a batch script in job 4242 on node[01-02]."""

    def __init__(self, root: Path):
        self.bin, self.log, self.tmp = root / "bin", root / "log", root / "tmp"
        for d in (self.bin, self.log, self.tmp):
            d.mkdir()
        fakes = {
            "scontrol": FAKE_SCONTROL,
            "srun": FAKE_SRUN,
            "scancel": FAKE_SCANCEL,
            "nvidia-smi": FAKE_NVIDIA_SMI,
            "deepspeed": FAKE_DEEPSPEED,
        }
        for name, text in fakes.items():
            path = self.bin / name
            path.write_text(text)
            path.chmod(0o755)
        (root / "fake_rank.py").write_text(FAKE_RANK)
        self.rank_script = root / "fake_rank.py"
        self.env = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(root),
            "TMPDIR": str(self.tmp),
            "FAKE_LOG": str(self.log),
            "FAKE_PYTHON": sys.executable,
            "FAKE_EXIT": "0",
            "SLURM_JOB_ID": JOB_ID,
            "SLURM_JOB_NAME": "dtrain",
            "SLURM_JOB_NODELIST": "node[01-02]",
            "SLURM_NNODES": "2",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_GPUS_ON_NODE": "4",
            "SLURM_SUBMIT_DIR": str(REPO),
            # What a remote rank needs from the submitting shell.
            "WANDB_API_KEY": "wandb-secret",
            "WANDB_PROJECT": "dtrain-tests",
            "HF_HOME": "/shared/hf",
            "HF_TOKEN": "hf-secret",
            "HYDRA_FULL_ERROR": "1",
            "NCCL_DEBUG": "INFO",
            "NCCL_SOCKET_IFNAME": "ib0",
        }

    def start(self, *overrides: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            [BASH, str(SBATCH), *overrides],
            env={**self.env, **env},
            cwd=self.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, *overrides: str, **env: str) -> subprocess.CompletedProcess:
        proc = self.start(*overrides, **env)
        out, err = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def argv(self, name: str) -> list[str]:
        return (self.log / f"{name}.argv").read_bytes().decode().split("\0")[:-1]

    def rank_env(self, node: int) -> dict[str, str]:
        entries = (self.log / f"deepspeed.{node}.env").read_bytes().decode().split("\0")[:-1]
        return dict(entry.split("=", 1) for entry in entries)

    def lines(self, name: str) -> list[str]:
        path = self.log / name
        return path.read_text().splitlines() if path.exists() else []

    def kill_leftovers(self) -> None:
        """End the process groups the fake srun started (only on a failing test do any remain)."""
        for pgid in self.lines("step.pgids"):
            try:
                os.killpg(int(pgid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def slurm(tmp_path):
    fake = FakeSlurm(tmp_path)
    yield fake
    fake.kill_leftovers()


def expected_deepspeed_argv(node: int, hostfile: str, gpus: str = "4") -> list[str]:
    return [
        "--hostfile",
        hostfile,
        "--no_ssh",
        "--node_rank",
        str(node),
        "--num_nodes",
        "2",
        "--num_gpus",
        gpus,
        "--master_addr",
        "node01",
        "--master_port",
        MASTER_PORT,
        "launch/train.py",
        f"output_dir={REPO}/outputs/${{run_name}}-slurm{JOB_ID}",
        *OVERRIDES,
    ]


def test_one_launcher_per_node_with_the_same_master_port_and_run_directory(slurm):
    out = slurm.run(*OVERRIDES)
    assert out.returncode == 0, out.stdout + out.stderr

    srun = slurm.argv("srun")
    assert srun[: srun.index("bash")] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--export=ALL"]
    for node in (0, 1):
        argv = slurm.argv(f"deepspeed.{node}")
        hostfile = argv[1]
        assert argv == expected_deepspeed_argv(node, hostfile)
        assert Path(hostfile).parent == slurm.tmp  # each node writes its own, in its TMPDIR
        # --no_ssh still needs every node in the hostfile, or DeepSpeed makes a one-node world on 127.0.0.1.
        assert (slurm.log / f"hostfile.{node}").read_text() == "node01 slots=4\nnode02 slots=4\n"
    assert slurm.lines("scontrol.log") == ["show hostnames node[01-02]"]  # no requeue after a clean finish
    assert not slurm.lines("nvidia-smi.log")  # SLURM_GPUS_ON_NODE was enough
    assert "master node01:" + MASTER_PORT in out.stdout


def test_the_rendered_output_dir_composes_to_run_name_and_job_id():
    from dtrain.config import compose_job

    job = compose_job([f"output_dir={REPO}/outputs/${{run_name}}-slurm{JOB_ID}", "+exp=7b_zero3", "data.path=/data/train.jsonl"])
    assert job.output_dir == f"{REPO}/outputs/7b_zero3-slurm{JOB_ID}"


def test_a_user_output_dir_replaces_the_default(slurm):
    out = slurm.run("+exp=7b_zero3", "output_dir=/shared/runs/a")
    assert out.returncode == 0, out.stdout + out.stderr
    argv = slurm.argv("deepspeed.0")
    assert argv[argv.index("launch/train.py") + 1 :] == ["+exp=7b_zero3", "output_dir=/shared/runs/a"]


def test_environment_reaches_every_rank(slurm):
    out = slurm.run(*OVERRIDES)
    assert out.returncode == 0, out.stdout + out.stderr
    for node in (0, 1):
        env = slurm.rank_env(node)
        for key in ("WANDB_API_KEY", "WANDB_PROJECT", "HF_HOME", "HF_TOKEN", "HYDRA_FULL_ERROR", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME"):
            assert env.get(key) == slurm.env[key], key
        assert env["PYTHONUNBUFFERED"] == "1"
        assert env["SLURM_NODEID"] == str(node)
    assert "wandb-secret" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    "env, gpus, asked_nvidia_smi",
    [
        ({"SLURM_GPUS_ON_NODE": ""}, "2", True),
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:8"}, "8", False),
        ({"GPUS_PER_NODE": "3"}, "3", False),
    ],
)
def test_gpus_per_node(slurm, env, gpus, asked_nvidia_smi):
    out = slurm.run(*OVERRIDES, **env)
    assert out.returncode == 0, out.stdout + out.stderr
    argv = slurm.argv("deepspeed.1")
    assert argv == expected_deepspeed_argv(1, argv[1], gpus=gpus)
    assert (slurm.log / "hostfile.1").read_text() == f"node01 slots={gpus}\nnode02 slots={gpus}\n"
    assert slurm.lines("nvidia-smi.log") == (["-L"] if asked_nvidia_smi else [])


def test_exit_75_requeues_the_job_and_exits_0(slurm):
    out = slurm.run(*OVERRIDES, FAKE_EXIT="75 75")
    assert out.returncode == 0, out.stdout + out.stderr
    assert slurm.lines("scontrol.log") == ["show hostnames node[01-02]", f"requeue {JOB_ID}"]


@pytest.mark.parametrize("codes, expected", [("3 3", 3), ("75 86", 86), ("2 0", 2)])
def test_other_exit_codes_are_propagated_and_not_requeued(slurm, codes, expected):
    out = slurm.run(*OVERRIDES, FAKE_EXIT=codes)
    assert out.returncode == expected, out.stdout + out.stderr
    assert slurm.lines("scontrol.log") == ["show hostnames node[01-02]"]


def test_sigusr1_to_the_batch_script_reaches_the_ranks_which_checkpoint_and_get_requeued(slurm):
    proc = slurm.start(*OVERRIDES, FAKE_RANK=str(slurm.rank_script))
    ready = [slurm.log / f"rank.{node}.ready" for node in (0, 1)]
    deadline = time.monotonic() + 15
    while not all(path.exists() for path in ready):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the fake ranks did not start"
        time.sleep(0.05)

    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does
    out, err = proc.communicate(timeout=15)

    assert proc.returncode == 0, out + err
    assert slurm.lines("scancel.log") == [f"--signal=USR1 {JOB_ID}"]
    for node in (0, 1):
        assert (slurm.log / f"rank.{node}.signal").read_text() == "SIGUSR1"
        # The launcher processes ignore SIGUSR1 (they would die of it); the rank replaced that with its handler.
        assert (slurm.log / f"rank.{node}.ready").read_text() == "ignored"
    assert slurm.lines("scontrol.log") == ["show hostnames node[01-02]", f"requeue {JOB_ID}"]


def test_refuses_to_run_outside_the_repository_or_outside_slurm(slurm):
    out = slurm.run(*OVERRIDES, SLURM_SUBMIT_DIR=str(slurm.tmp))
    assert out.returncode == 2
    assert "submit from the dtrain repository root" in out.stderr
    out = slurm.run(*OVERRIDES, SLURM_JOB_ID="")
    assert out.returncode == 2
    assert "not inside a SLURM job" in out.stderr
    assert not (slurm.log / "srun.argv").exists()


def test_deepspeed_launcher_turns_the_rendered_command_into_the_right_world(slurm, monkeypatch):
    """DeepSpeed's own runner and per-node launcher, with process creation mocked out: node 1 gets ranks 4-7 of 8."""
    pytest.importorskip("deepspeed")
    from deepspeed.launcher import launch, runner

    out = slurm.run(*OVERRIDES)
    assert out.returncode == 0, out.stdout + out.stderr
    argv = slurm.argv("deepspeed.1")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret")

    spawned = []

    class FakePopen:
        def __init__(self, cmd, env=None, **kwargs):
            spawned.append((list(cmd), dict(env or {})))
            self.pid, self.returncode = 0, 0

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", FakePopen)
    runner.main(argv)
    ((cmd, env),) = spawned
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.launch"]
    assert "--master_addr=node01" in cmd and f"--master_port={MASTER_PORT}" in cmd and "--node_rank=1" in cmd
    assert env["WANDB_API_KEY"] == "wandb-secret"

    spawned.clear()
    monkeypatch.setattr(launch.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(launch.signal, "signal", lambda *args: None)  # not in the test process
    monkeypatch.setattr(launch.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(sys, "argv", ["deepspeed.launcher.launch", *cmd[4:]])
    launch.main()
    assert [int(env["RANK"]) for _, env in spawned] == [4, 5, 6, 7]
    for local_rank, (cmd, env) in enumerate(spawned):
        assert cmd[-len(OVERRIDES) - 3 :] == [
            "launch/train.py",
            f"--local_rank={local_rank}",
            f"output_dir={REPO}/outputs/${{run_name}}-slurm{JOB_ID}",
            *OVERRIDES,
        ]
        assert (env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("8", "node01", MASTER_PORT)
        assert env["WANDB_API_KEY"] == "wandb-secret"


def test_exit_codes_are_read_from_dtrain_errors():
    """The job script has no copy of dtrain's exit codes: it parses dtrain/errors.py, the one list."""
    import dtrain.errors as errors

    text = SBATCH.read_text()
    function = text[text.index("read_exit_codes() {") :]
    function = function[: function.index("\n}\n") + 3]
    names = [name for name in vars(errors) if name.startswith("EXIT_") and name != "EXIT_CODES"]
    script = f"{function}\nread_exit_codes dtrain/errors.py\necho {' '.join('$' + name for name in names)}"
    out = subprocess.run([BASH, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(getattr(errors, name)) for name in names]
    assert sorted(errors.EXIT_CODES) == sorted(int(c) for c in out.stdout.split())
    assert "EXIT_PREEMPTED=" not in text  # no second definition to drift apart
