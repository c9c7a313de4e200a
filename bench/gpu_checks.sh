#!/usr/bin/env bash
# Issue 7's GPU checks on one H100/H200, one after the other; every figure lands as JSON under $OUT.
#
#   OUT=/tmp/gpu bash bench/gpu_checks.sh            # about 15 minutes on one H100
#
# Not yet run (no GPU has been lent to this project so far): the commands are the CPU-tested bench scripts
# with GPU sizes. Each prints its table; copy the figures into docs/BENCHMARKS.md with the date and the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
PY=${PY:-python}
mkdir -p "$OUT"
# 4096-token packed rows of the bundled data, bf16, ZeRO-2 on one GPU, tokenised data not cached.
LONG=(+exp=tiny_cpu data.max_seq_len=4096 data.packing=true train.micro_batch_size=1 train.grad_accum_steps=1
      precision=bf16 zero=zero2 data.cache_dir= train.log_every=10)

run() { echo "== $*"; "$PY" "$@" || echo "!! failed: $*"; }

for shape in llama3_1b llama3_3b; do
    for ckpt in false true; do
        run bench/throughput.py "${LONG[@]}" --shape "$shape" --num-gpus 1 --steps 30 \
            model.gradient_checkpointing=$ckpt --json "$OUT/throughput_${shape}_ckpt_${ckpt}.json"
    done
done
run bench/attention.py "${LONG[@]}" --shape llama3_1b --num-gpus 1 --steps 20 --json "$OUT/attention_llama3_1b.json"
run bench/chunked_loss_memory.py --vocab 128256 --hidden 4096 --tokens 4096 --chunk-size 1024 --dtype bf16 \
    --json "$OUT/chunked_loss_128k.json"
run bench/memory.py +exp=tiny_cpu train.micro_batch_size=8 --num-gpus 1 --json "$OUT/memory_tiny.json"
