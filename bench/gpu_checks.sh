#!/usr/bin/env bash
# Issue 7's GPU checks on one H100/H200, one after the other; every figure lands as JSON under $OUT.
#
#   OUT=/tmp/gpu bash bench/gpu_checks.sh            # about 20 minutes on one H100
#   # rehearsal on CPU (every command and argument, tiny model, a few steps; about 3 minutes):
#   FULL_SHAPES=tiny LORA_SHAPE=tiny SEQ=256 STEPS=3 MEMORY_SHAPE=tiny VOCAB=32000 HIDDEN=512 OUT=/tmp/gpu-rehearsal \
#       PY=.venv/bin/python bash bench/gpu_checks.sh
#
# Not yet run on a GPU (none has been lent to this project so far): the commands are the CPU-tested bench
# scripts with GPU sizes. Each prints its table; copy the figures into docs/BENCHMARKS.md with the date and GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
PY=${PY:-$(command -v python || command -v python3)}
FULL_SHAPES=${FULL_SHAPES:-llama3_1b llama3_3b}
LORA_SHAPE=${LORA_SHAPE:-llama3_8b}
MEMORY_SHAPE=${MEMORY_SHAPE:-llama3_1b}
SEQ=${SEQ:-4096}
STEPS=${STEPS:-30}
VOCAB=${VOCAB:-128256}
HIDDEN=${HIDDEN:-4096}
mkdir -p "$OUT"
# $SEQ-token packed rows of the bundled data, bf16, ZeRO-2 on one GPU, tokenised data not cached.
LONG=(+exp=tiny_cpu data.max_seq_len=$SEQ data.packing=true train.micro_batch_size=1 train.grad_accum_steps=1
      precision=bf16 zero=zero2 data.cache_dir= train.log_every=10)
failed=0
run() { echo "== $*"; "$PY" "$@" || { echo "!! failed: $*"; failed=$((failed + 1)); }; }

# Full fine-tuning: MFU and tokens/s, gradient checkpointing off and on.
for shape in $FULL_SHAPES; do
    for ckpt in false true; do
        run bench/throughput.py "${LONG[@]}" --shape "$shape" --num-gpus 1 --steps "$STEPS" \
            model.gradient_checkpointing=$ckpt --json "$OUT/throughput_${shape}_ckpt_${ckpt}.json"
    done
done
# LoRA on an 8B shape (random bf16 weights written to disk first: adapters need a base that exists).
run bench/throughput.py "${LONG[@]}" --shape "$LORA_SHAPE" --save-weights peft=lora model.gradient_checkpointing=true \
    --num-gpus 1 --steps "$STEPS" --json "$OUT/throughput_${LORA_SHAPE}_lora.json"
# Chunked loss inside training (Liger's fused kernel when liger-kernel is installed, dtrain's chunks otherwise).
first=${FULL_SHAPES%% *}
run bench/throughput.py "${LONG[@]}" --shape "$first" --num-gpus 1 --steps "$STEPS" train.loss_chunk_size=1024 \
    --json "$OUT/throughput_${first}_chunked_loss.json"
# Attention: eager, sdpa, flash-attn when installed.
run bench/attention.py "${LONG[@]}" --shape "$first" --num-gpus 1 --steps "$STEPS" --json "$OUT/attention_${first}.json"
# The loss head alone at a 128k vocabulary: peak memory plain vs chunked.
run bench/chunked_loss_memory.py --vocab "$VOCAB" --hidden "$HIDDEN" --tokens "$SEQ" --chunk-size 1024 --dtype bf16 \
    --json "$OUT/chunked_loss_${VOCAB}.json"
# Peak CUDA memory against the planner, full fine-tuning and LoRA.
run bench/memory.py +exp=tiny_cpu --shape "$MEMORY_SHAPE" --num-gpus 1 --configs zero2:none,zero3:none,zero2:lora \
    --json "$OUT/memory_${MEMORY_SHAPE}.json"
# Issue 17, long sequences on one GPU: an 8B shape (random weights) with the whole stack (ZeRO-3 offload,
# recomputation, chunked loss, tiled MLP, activation offload) on single long conversations: tokens/s and MFU at
# each length, and the planner's longest sequence beside ALST's published 500K on one H100 80GB.
LONG_SHAPE=${LONG_SHAPE:-llama3_8b}
LONG_SEQS=${LONG_SEQS:-32768 131072}
"$PY" -c "
import json, random, sys
rng, words = random.Random(0), ['ka%s' % c for c in 'nmstlrdv']
with open('$OUT/long_chats.jsonl', 'w') as f:
    for i in range(64):  # about 5 tokens per word with the tiny tokenizer: one conversation fills the longest row
        text = lambda k: ' '.join(rng.choice(words) for _ in range(k))
        f.write(json.dumps({'messages': [{'role': 'user', 'content': text(${LONG_SEQS##* } // 8)},
                                         {'role': 'assistant', 'content': text(${LONG_SEQS##* } // 8)}]}) + '\n')
"
STACK=(+exp=tiny_cpu data.path="$OUT/long_chats.jsonl" data.eval_path=null data.eval_fraction=0 data.truncation=truncate
       data.packing=false data.cache_dir= train.micro_batch_size=1 train.grad_accum_steps=1 precision=bf16
       zero=zero3_offload model.gradient_checkpointing=true model.tiled_mlp=true model.activation_offload=true
       train.loss_chunk_size=4096 train.log_every=1)
for seq in $LONG_SEQS; do
    run bench/throughput.py "${STACK[@]}" data.max_seq_len=$seq --shape "$LONG_SHAPE" --num-gpus 1 --steps 4 --warmup 1 \
        --json "$OUT/long_${LONG_SHAPE}_${seq}.json"
done
run launch/plan.py +exp=8b_zero3_offload plan.gpus=1 plan.gpu=H100 plan.max_seq_len=search plan.format=json
run launch/plan.py +exp=8b_zero3_offload plan.gpus=8 plan.gpu=H100 plan.max_seq_len=search plan.format=json
echo "gpu_checks: $failed command(s) failed; JSON in $OUT"
exit $((failed > 0))
