"""Real-corpus figures: preparation throughput by process count, and per-rank memory and time to step 1 by corpus size.

    .venv/bin/python bench/corpus.py --json corpus.json                      # 10k / 100k / 1M conversations
    .venv/bin/python bench/corpus.py --smoke --json /tmp/c.json      # 200 and 600 conversations (600: 3 x 200)
    .venv/bin/python bench/corpus.py --shapes-only --json shapes.json   # tokens/s by record shape only (10k each)

Synthetic two-turn chats of about 600 tokens (tiny tokenizer), as in issue 16's measurement of the list-based path.
``--shapes`` also prepares the same number of conversations of other record shapes (issue 22): ``sharegpt`` (the
chats as ShareGPT records), ``tools`` (OpenAI function calling: tool schemas, a call with object or string
arguments, its JSON result, the answer, a follow-up) and ``sharegpt_tools`` (the same as ShareGPT
``function_call``/``observation`` turns). Tool shapes render with Qwen2.5's published template (ChatML, which the
tiny tokenizer speaks); each shape's tokens/s is reported beside the plain chats' (all processes).

1. ``launch/prepare.py``'s preparation (in this process) on the smallest corpus with 1, 2, ... ``--procs`` processes: seconds and tokens/s.
2. Each corpus size is prepared (all processes) into a token store; sizes above ``--max-prepared`` are built by
   replicating the largest prepared store (same examples under new names: the store and the loader see a corpus of
   that many examples and tokens; preparation speed is what step 1 measures).
3. For each store, ``deepspeed --num_gpus 2 launch/train.py`` trains one step from ``data.prepared_path``: the time
   from launch to the first step record, and the peak RSS of each rank (``memory.json``). The RSS growth per corpus
   token between the smallest and the largest corpus is the figure the issue targets (below 1 byte per token).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from common import QUIET, REPO_ROOT, machine, make_tiny_pretrained, table, write_json

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ri", "po") for b in ("n", "m", "s", "t", "la", "ro", "de", "vi")]
STORE_FILES = ("ids", "trained", "offsets", "trained_n", "source", "last_turn", "truncated", "names", "name_off")


def write_chats(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):

            def text(k: int) -> str:
                return " ".join(rng.choice(WORDS) for _ in range(k))

            messages = [
                {"role": "user", "content": f"{i}: {text(60)}"},
                {"role": "assistant", "content": text(90)},
                {"role": "user", "content": text(40)},
                {"role": "assistant", "content": text(90)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


SHAPES = ("chats", "sharegpt", "tools", "sharegpt_tools")
TOOL_TEMPLATE = "tests/assets/chat_templates/qwen2.5.jinja"
TOOL_MAX_SEQ_LEN = 4096
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"Look up {name} for a topic.",
            "parameters": {"type": "object", "properties": {"topic": {"type": "string"}, "limit": {"type": "integer"}}},
        },
    }
    for name in ("search", "define")
]


def write_corpus(shape: str, path: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` synthetic conversations of ``shape`` in ``path``; returns the data overrides that read them."""
    if shape == "chats":
        write_chats(path, n, seed)
        return []
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with path.open("w") as f:
        for i in range(n):
            if shape == "sharegpt":
                turns = [("human", f"{i}: {text(60)}"), ("gpt", text(90)), ("human", text(40)), ("gpt", text(90))]
                f.write(json.dumps({"conversations": [{"from": a, "value": v} for a, v in turns]}) + "\n")
                continue
            name, arguments = rng.choice(("search", "define")), {"topic": text(3), "limit": rng.randint(1, 9)}
            result = {"title": text(4), "summary": text(30)}
            question, answer, follow_up, last = f"{i}: {text(50)}", text(80), text(30), text(80)
            if shape == "tools":
                # Every other record gives its arguments as a JSON string (as OpenAI's API returns them).
                call = {"id": f"call{i % 100000:05d}", "type": "function", "function": {"name": name, "arguments": arguments}}
                if i % 2:
                    call["function"]["arguments"] = json.dumps(arguments)
                messages = [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": call["id"], "name": name, "content": json.dumps(result)},
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": follow_up},
                    {"role": "assistant", "content": last},
                ]
                f.write(json.dumps({"tools": TOOLS, "messages": messages}) + "\n")
            else:
                turns = [
                    ("human", question),
                    ("function_call", json.dumps({"name": name, "arguments": arguments})),
                    ("observation", json.dumps(result)),
                    ("gpt", answer),
                    ("human", follow_up),
                    ("gpt", last),
                ]
                record = {"tools": json.dumps(TOOLS), "conversations": [{"from": a, "value": v} for a, v in turns]}
                f.write(json.dumps(record) + "\n")
    # Qwen2.5's tool prompt (its instructions and the schemas) takes the records past the 2048 tokens of plain chats.
    return [f"data.chat_template={TOOL_TEMPLATE}", f"data.max_seq_len={TOOL_MAX_SEQ_LEN}"] if "tools" in shape else []


_PREPARED: dict[tuple, tuple[Path, dict]] = {}
"""(data, processes, overrides) -> (store, summary): a corpus already prepared the same way is not prepared again."""


def prepare(data: Path, store: Path, procs: int, model: Path, overrides: tuple = (), fail: bool = True) -> dict:
    """Prepare ``data`` into ``store`` as ``launch/prepare.py`` does, in this process (``prepare_job_store``: a
    Python start-up less per preparation, 4-5 s here); its summary (an identical earlier preparation: ``store``
    links to that store and its summary is returned)."""
    from dtrain.config import compose_job
    from dtrain.data.prepare import prepare_job_store
    from dtrain.errors import DtrainError

    key = (str(data), procs, overrides)
    if key in _PREPARED:
        done, summary = _PREPARED[key]
        store.symlink_to(done, target_is_directory=True)
        return summary
    settings = ["+exp=tiny_cpu", f"model.path={model}", f"data.path={data}", "data.eval_path=null", "data.format=auto"]
    settings += ["data.eval_fraction=0.001", f"data.num_proc={procs}", f"data.prepared_path={store}"]
    if not any(o.startswith("data.max_seq_len=") for o in overrides):
        settings.append("data.max_seq_len=2048")
    try:
        summary = prepare_job_store(compose_job([*settings, *overrides]), progress=False)
    except DtrainError as e:
        if fail:
            raise SystemExit(f"prepare failed: {e}") from None
        return {"error": str(e).splitlines()[-1][-300:]}
    _PREPARED[key] = (store, summary)
    return summary


def prepare_shapes(shapes: list[str], n: int, procs: int, model: Path, root: Path, template: str | None = None) -> list[dict]:
    """Tokens/s of preparing ``n`` conversations of each record shape with ``procs`` processes (vs plain chats);
    ``template``: render every shape with this chat template (default: each shape's own, see ``write_corpus``)."""
    rows = []
    for shape in shapes:
        data = root / (f"chats_{n}.jsonl" if shape == "chats" else f"shape_{shape}_{n}.jsonl")  # chats: the sweep's corpus
        overrides = write_corpus(shape, data, n)
        if template:
            overrides = [f"data.chat_template={template}", f"data.max_seq_len={TOOL_MAX_SEQ_LEN}"]
        summary = prepare(data, root / f"shape_store_{shape}", procs, model, tuple(overrides), fail=False)
        if "error" in summary:
            rows.append({"shape": shape, "conversations": n, "error": summary["error"]})
        else:
            done = summary["prepare"]
            tokens = summary["train"]["tokens"] + summary["eval"]["tokens"]
            rows.append({"shape": shape, "conversations": n, "tokens": tokens, "formats": summary.get("formats")} | done)
        print(f"[bench] {shape}: {rows[-1]}", flush=True)
    chats = next((r["tokens_per_s"] for r in rows if r["shape"] == "chats" and "tokens_per_s" in r), None)
    for r in rows:
        r["vs_chats"] = r["tokens_per_s"] / chats if chats and "tokens_per_s" in r else None
    return rows


def replicate(store: Path, copies: int, out: Path) -> None:
    """A store of ``copies`` x the train split of ``store`` (names suffixed per copy); eval and prompts kept."""
    from dtrain.data.store import file_crc32

    out.mkdir()
    meta = json.loads((store / "meta.json").read_text())
    n, tokens = meta["train"]["examples"], meta["train"]["tokens"]
    offsets = np.fromfile(store / "train.offsets", np.int64)
    names = np.fromfile(store / "train.names", np.uint8).tobytes()
    name_off = np.fromfile(store / "train.name_off", np.int64)
    with (out / "train.offsets").open("wb") as f:
        f.write(np.zeros(1, np.int64).tobytes())
        for c in range(copies):
            f.write((offsets[1:] + c * tokens).tobytes())
    with (out / "train.names").open("wb") as fn, (out / "train.name_off").open("wb") as fo:
        fo.write(np.zeros(1, np.int64).tobytes())
        written = 0
        for c in range(copies):
            chunk = b"".join(names[name_off[i] : name_off[i + 1]] + f"#copy{c}".encode() for i in range(n))
            ends = written + name_off[1:] + np.arange(1, n + 1) * len(f"#copy{c}")
            fn.write(chunk)
            fo.write(ends.astype(np.int64).tobytes())
            written += len(chunk)
    for name in ("ids", "trained", "trained_n", "source", "last_turn", "truncated"):
        data = (store / f"train.{name}").read_bytes()
        with (out / f"train.{name}").open("wb") as f:
            for _ in range(copies):
                f.write(data)
    for name in STORE_FILES:
        (out / f"eval.{name}").write_bytes((store / f"eval.{name}").read_bytes())
    # The store records each file's size and CRC-32 (dtrain/data/store.py): the replicated files' own, read once here.
    files = {name: {"bytes": (out / f"train.{name}").stat().st_size, "crc32": file_crc32(out / f"train.{name}")} for name in STORE_FILES}
    meta["train"] = {**meta["train"], "examples": n * copies, "tokens": tokens * copies, "files": files}
    (out / "meta.json").write_text(json.dumps(meta))


BASELINE = """
import resource, sys, time
from dtrain.config.schema import DataConfig
from dtrain.data import ChatRenderer, prepare_data, resolve_chat_template
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2]); resolve_chat_template(tok, None)
start = time.perf_counter()
cfg = DataConfig(path=sys.argv[1], eval_fraction=0.001, max_seq_len=2048, num_proc=1, cache_dir="")
data = prepare_data(cfg, ChatRenderer(tok, "assistant"), 0, 4)
seconds = time.perf_counter() - start
tokens = sum(len(e.input_ids) for e in data.train) + sum(len(e.input_ids) for e in data.eval)
print(seconds, tokens, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def baseline_prepare(commit: str, data: Path, model: Path, root: Path) -> dict:
    """One process of ``prepare_data`` at ``commit`` (e.g. the list-based path before the store) on the same file."""
    tree = root / f"baseline_{commit}"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO_ROOT, check=True, capture_output=True)
    try:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        out = subprocess.run([sys.executable, "-c", BASELINE, str(data), str(model)], cwd=tree, env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"baseline failed: {out.stderr[-2000:]}")
        seconds, tokens, rss = out.stdout.split()[-3:]
        return {
            "procs": 1,
            "tokens": int(tokens),
            "seconds": float(seconds),
            "tokens_per_s": int(tokens) / float(seconds),
            "peak_rss": int(rss),
        }
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO_ROOT, capture_output=True)


def train_one_step(store: Path, data: Path, model: Path, run_dir: Path) -> dict:
    from dtrain.dist import free_port

    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py"]
    cmd += [f"output_dir={run_dir}", *QUIET, "+exp=tiny_cpu", f"model.path={model}", "model.init=pretrained", "precision=fp32"]
    cmd += [f"data.path={data}", "data.eval_path=null", "data.eval_fraction=0.001", "data.max_seq_len=2048", "data.packing=false"]
    cmd += [f"data.prepared_path={store}", "data.cache_dir=null", "train.max_steps=1", "train.micro_batch_size=4", "train.eval_every=0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, first_step = run_dir / "metrics.jsonl", None
    while proc.poll() is None:
        if first_step is None and metrics.is_file() and metrics.stat().st_size > 0:
            first_step = time.monotonic() - started
        time.sleep(0.05)
    output = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"training failed: {output[-3000:]}")
    measured = json.loads((run_dir / "memory.json").read_text())["measured_per_rank"]
    return {"time_to_step1_s": first_step, "data_setup_s": data_setup_seconds(run_dir / "train.log")} | {
        "peak_rss_per_rank": [r["peak_rss"] for r in measured]
    }


def data_setup_seconds(log: Path) -> float:
    """From opening the store to the loader's plan (mask audit, resolution, units, sampler): the data's share."""
    stamps = {}
    for line in log.read_text().splitlines():
        for key, marker in (("open", "token store"), ("ready", "padding efficiency (real tokens")):
            if marker in line and key not in stamps:
                stamps[key] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return (stamps["ready"] - stamps["open"]).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="conversations per corpus")
    parser.add_argument("--procs", default=None, help="process counts to prepare with (default: 1 .. all cores, doubling)")
    parser.add_argument("--max-prepared", type=int, default=100_000, help="larger corpora replicate the largest prepared store")
    parser.add_argument("--baseline", default=None, help="also time one process of prepare_data at this commit (e.g. 2f50aea)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--smoke", action="store_true", help="200 and 600 (replicated) conversations, 1 and 2 processes; shapes chats, sharegpt, tools"
    )
    parser.add_argument("--shapes", default="chats", help=f"record shapes whose preparation tokens/s to compare: any of {','.join(SHAPES)}")
    parser.add_argument("--shapes-only", action="store_true", help="only compare the record shapes (no process or size sweep)")
    parser.add_argument(
        "--shapes-template",
        default=None,
        help=f"render every shape with this chat template, e.g. {TOOL_TEMPLATE} (default: chats and sharegpt with the tiny "
        "model's ChatML template, tool shapes with Qwen2.5's)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.procs, args.max_prepared = "200,600", "1,2", 200
        args.shapes = "chats,sharegpt,tools" if args.shapes == "chats" else args.shapes
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {SHAPES}")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    cores = len(os.sched_getaffinity(0))
    procs = [int(p) for p in args.procs.split(",")] if args.procs else sorted({1, *[2**k for k in range(1, 8) if 2**k < cores], cores})
    root = Path(tempfile.mkdtemp(prefix="dtrain-bench-corpus-"))
    model = make_tiny_pretrained(root / "model")
    shape_rows = (
        prepare_shapes(shapes, sizes[0], procs[-1], model, root, args.shapes_template) if len(shapes) > 1 or args.shapes_only else []
    )
    shape_table = table(
        shape_rows,
        [
            ("shape", "record shape", ""),
            ("conversations", "conversations", ""),
            ("tokens", "tokens", ""),
            ("seconds", "seconds", ".1f"),
            ("tokens_per_s", "tokens/s", ""),
            ("vs_chats", "x plain chats", ".2f"),
            ("error", "error", ""),
        ],
    )
    if args.shapes_only:
        print(f"\nmachine: {machine()}\n{shape_table}")
        write_json(args.json, {"bench": "corpus", "machine": machine(), "shapes": shape_rows})
        return

    prep_rows = []
    smallest = root / f"chats_{sizes[0]}.jsonl"
    if not smallest.is_file():  # written for the shape comparison already: the same file keeps its stores valid
        write_chats(smallest, sizes[0])
    for p in procs:
        summary = prepare(smallest, root / f"prep_{p}", p, model)
        prep_rows.append(
            {"procs": p, "conversations": sizes[0], "tokens": summary["train"]["tokens"] + summary["eval"]["tokens"]} | summary["prepare"]
        )
        print(f"[bench] prepared {sizes[0]} conversations with {p} process(es): {summary['prepare']}", flush=True)
    if args.baseline:
        prep_rows.insert(0, {"name": f"list-based path at {args.baseline}"} | baseline_prepare(args.baseline, smallest, model, root))
        print(f"[bench] baseline: {prep_rows[0]}", flush=True)
    base = next(r for r in prep_rows if "name" not in r)["tokens_per_s"]
    for r in prep_rows:
        r["speedup"] = r["tokens_per_s"] / base
        r.setdefault("name", "token store")

    size_rows, prepared = [], {}
    for n in sizes:
        store = root / f"store_{n}"
        data = root / f"chats_{n}.jsonl"
        if n <= args.max_prepared:
            if not data.is_file():
                write_chats(data, n)
            summary = prepare(data, store, procs[-1], model)
            prepared[n] = store
            how = f"prepared ({summary['prepare']['seconds']:.0f} s, {procs[-1]} processes)"
        else:
            largest = max(prepared)
            copies = -(-n // largest)
            replicate(prepared[largest], copies, store)
            data = root / f"chats_{largest}.jsonl"  # what the replicated store was prepared from
            how = f"{copies} x the {largest}-conversation store"
        meta = json.loads((store / "meta.json").read_text())
        figures = train_one_step(store, data, model, root / f"run_{n}")
        size_rows.append({"conversations": n, "train_tokens": meta["train"]["tokens"], "store": how} | figures)
        print(f"[bench] {n} conversations: {figures}", flush=True)
    small, large = size_rows[0], size_rows[-1]
    growth = [
        (b - a) / (large["train_tokens"] - small["train_tokens"]) for a, b in zip(small["peak_rss_per_rank"], large["peak_rss_per_rank"])
    ]

    print(f"\nmachine: {machine()}")
    print(
        table(
            prep_rows,
            [
                ("name", "path", ""),
                ("procs", "processes", ""),
                ("tokens", "tokens", ""),
                ("seconds", "seconds", ".1f"),
                ("tokens_per_s", "tokens/s", ""),
                ("speedup", "x 1 process", ".2f"),
            ],
        )
    )
    for r in size_rows:
        r["rss"] = " / ".join(f"{b / 2**30:.2f}" for b in r["peak_rss_per_rank"])
    print()
    print(
        table(
            size_rows,
            [
                ("conversations", "conversations", ""),
                ("train_tokens", "tokens", ""),
                ("rss", "peak RSS per rank (GiB)", ""),
                ("time_to_step1_s", "launch to step 1 (s)", ".1f"),
                ("data_setup_s", "of which data (s)", ".1f"),
                ("store", "store", ""),
            ],
        )
    )
    if shape_rows:
        print(f"\n{shape_table}")
    print(
        f"\nRSS growth per corpus token, {small['conversations']} -> {large['conversations']} conversations: "
        + " / ".join(f"{g:.3f}" for g in growth)
        + " bytes"
    )
    write_json(
        args.json,
        {
            "bench": "corpus",
            "machine": machine(),
            "prepare": prep_rows,
            "sizes": size_rows,
            "rss_bytes_per_token": growth,
            "shapes": shape_rows,
        },
    )


if __name__ == "__main__":
    main()
