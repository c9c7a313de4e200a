"""Generate dtrain's bundled "embedded default" assets, deterministically.

Remake everything with (from the repository root):

    python scripts/make_assets.py

Writes:
  dtrain/assets/tiny/   tiny Llama config + byte-level tokenizer with a ChatML
                        chat template (no weights: build the model with
                        AutoModelForCausalLM.from_config).
  dtrain/assets/data/   train.jsonl / eval.jsonl (messages format) and
                        alpaca_sample.jsonl (instruction/input/output format)
                        for a synthetic text-transformation task.
  dtrain/assets/README.md

The script then checks that the folder loads with the Auto* classes, that
decoding round-trips, and that chat-template renderings are token prefixes of
each other (the SFT masking code relies on it). Same seed -> same bytes.
"""

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "dtrain" / "assets"
TINY, DATA = ASSETS / "tiny", ASSETS / "data"
SEED = 1234
N_TRAIN, N_EVAL, N_ALPACA = 3000, 200, 50

# --- tokenizer / model -------------------------------------------------------
BOS, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIALS = [BOS, IM_START, IM_END, PAD]  # ids 256, 257, 258, 259
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# RoPE theta 100 (not 10000) and init std 0.08 (~1/sqrt(hidden), not 0.02) make the copy circuit form
# early and reliably: plain-torch SFT, bs 32, lr 2e-3, 300 steps -> 100/93/99% exact match over seeds
# 0/1/2; with the Llama defaults only seed 0 got there (seeds 1/2: 17%/3% at step 200).
MODEL = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    initializer_range=0.08,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0},
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def bytes_to_unicode():
    """GPT-2's byte -> printable-char table (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tokenizer():
    """Byte-level BPE with the 256-byte alphabet and no merges: 1 byte = 1 token.

    Token id == byte value for ids 0..255; the special tokens follow. No BOS/EOS
    is added automatically (no post-processor), so tokenizer(text) adds nothing.
    """
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=MODEL["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer):
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL,
    )


# --- synthetic task ----------------------------------------------------------
# name -> (how the lowercase input text is presented, what the answer is)
OPS = {
    # One per-position transformation: a 4-layer model learns it on 2 CPU ranks in ~300 steps. Mixes of
    # operations (reverse, repeat, lower) and multi-word inputs were tried and need far longer to learn.
    "upper": (str.lower, str.upper),
}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer with the result only.", "You transform text exactly as instructed."]
USER_FORMAT = "{op}: {text}"
P_SYSTEM, P_MULTI_TURN = 0.15, 0.15
N_WORDS_WEIGHTS = {1: 1.0}


class WordSource:
    """Random lowercase 'words' (3-8 letters); `banned` keeps eval words out of train."""

    def __init__(self, rng, banned=()):
        self.rng, self.banned, self.used = rng, set(banned), set()

    def word(self):
        while True:
            w = "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(self.rng.randint(3, 8)))
            if w not in self.banned:
                self.used.add(w)
                return w

    def text(self):
        k = self.rng.choices(list(N_WORDS_WEIGHTS), weights=list(N_WORDS_WEIGHTS.values()))[0]
        return " ".join(self.word() for _ in range(k))


def exchange(rng, words):
    op = rng.choice(sorted(OPS))
    present, transform = OPS[op]
    text = present(words.text())
    return op, text, transform(text)


def make_conversation(rng, words, idx, split):
    messages = []
    if rng.random() < P_SYSTEM:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(2 if rng.random() < P_MULTI_TURN else 1):
        op, text, answer = exchange(rng, words)
        messages += [{"role": "user", "content": USER_FORMAT.format(op=op, text=text)}, {"role": "assistant", "content": answer}]
    return {"id": f"{split}-{idx:05d}", "messages": messages}


def make_alpaca(rng, words):
    op, text, answer = exchange(rng, words)
    if rng.random() < 0.2:  # some records carry everything in the instruction
        return {"instruction": USER_FORMAT.format(op=op, text=text), "input": "", "output": answer}
    return {"instruction": op, "input": text, "output": answer}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


README = """# dtrain embedded default assets

Generated by `scripts/make_assets.py`; do not edit by hand. Remake with

    python scripts/make_assets.py

(from the repository root; deterministic, seed {seed}).

- `tiny/`: a tiny Llama `config.json` ({layers} layers, hidden {hidden}, {heads} heads,
  intermediate {inter}, vocab {vocab}, RoPE theta 100, init std 0.08) and a byte-level tokenizer (one token per
  byte, ids 0-255 = byte values) with special tokens `<|endoftext|>` (bos, {bos}),
  `<|im_start|>` ({ims}), `<|im_end|>` (eos / end of turn, {eos}), `<|pad|>` ({pad}),
  and a ChatML chat template. No weights: build the model with
  `AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))`.
  The tokenizer adds no special tokens by itself.
- `data/train.jsonl` ({n_train}), `data/eval.jsonl` ({n_eval}): synthetic chat data,
  `{{"id", "messages": [{{"role", "content"}}]}}`. The user asks `OP: TEXT` where OP is
  one of {ops} and TEXT is a random lowercase word of 3-8 letters; the assistant
  answers with the transformed text (`upper: abcd` -> `ABCD`). ~15% have a system prompt, ~15% have two
  user/assistant exchanges. No eval word occurs in train.
- `data/alpaca_sample.jsonl` ({n_alpaca}): the same task as `instruction`/`input`/`output`
  (instruction = OP, input = TEXT; ~20% put `OP: TEXT` in the instruction, empty input).
"""


# --- checks ------------------------------------------------------------------
def check(data):
    tok = AutoTokenizer.from_pretrained(TINY)
    cfg = AutoConfig.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_config(cfg)
    assert cfg.vocab_size == len(tok) == model.get_input_embeddings().num_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tok.pad_token_id != tok.eos_token_id and tok.eos_token == IM_END
    for s in ["hello world", "  two  spaces\nnew line\n", "upper: abc\tdef!?", "~`{}[]"]:
        ids = tok(s)["input_ids"]
        assert len(ids) == len(s) and ids == list(s.encode()), (s, ids)
        assert tok.decode(ids, skip_special_tokens=True) == s
    lengths = []
    for row in data:
        msgs = row["messages"]
        full = tok.apply_chat_template(msgs, tokenize=False)
        full_ids = tok(full)["input_ids"]
        assert tok.decode(full_ids) == full
        lengths.append(len(full_ids))
        for k in range(1, len(msgs)):
            gen = msgs[k]["role"] == "assistant"
            part = tok(tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=gen))["input_ids"]
            assert full_ids[: len(part)] == part, (row["id"], k)
    return lengths


# Published shapes of the models the memory planner prices without their weights (launch/plan.py).
PLANNER_CONFIGS = {
    "llama2_7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama2_13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama2_70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama3_8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    # Llama-3.2-1B / 3B shapes: the GPU throughput benchmark builds them with random weights (bench/throughput.py --shape).
    "llama3_1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "llama3_3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
}


def write_planner_configs():
    from transformers import LlamaConfig

    for name, kw in PLANNER_CONFIGS.items():
        LlamaConfig(**{"tie_word_embeddings": False, "rms_norm_eps": 1e-5, **kw}).save_pretrained(ASSETS / "configs" / name)


def main():
    write_planner_configs()
    tok = build_tokenizer()
    TINY.mkdir(parents=True, exist_ok=True)
    DATA.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(TINY)
    cfg = build_config(tok)
    cfg.save_pretrained(TINY)

    rng = random.Random(SEED)
    eval_words = WordSource(rng)
    evals = [make_conversation(rng, eval_words, i, "eval") for i in range(N_EVAL)]
    train_words = WordSource(rng, banned=eval_words.used)
    train = [make_conversation(rng, train_words, i, "train") for i in range(N_TRAIN)]
    alpaca = [make_alpaca(rng, train_words) for _ in range(N_ALPACA)]
    assert not eval_words.used & train_words.used
    write_jsonl(DATA / "train.jsonl", train)
    write_jsonl(DATA / "eval.jsonl", evals)
    write_jsonl(DATA / "alpaca_sample.jsonl", alpaca)
    (ASSETS / "README.md").write_text(
        README.format(
            seed=SEED,
            layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads,
            inter=cfg.intermediate_size,
            vocab=cfg.vocab_size,
            bos=tok.bos_token_id,
            ims=tok.convert_tokens_to_ids(IM_START),
            eos=tok.eos_token_id,
            pad=tok.pad_token_id,
            n_train=N_TRAIN,
            n_eval=N_EVAL,
            n_alpaca=N_ALPACA,
            ops=", ".join(f"`{o}`" for o in sorted(OPS)),
        )
    )

    for name, rows in [("train", train), ("eval", evals)]:
        lens = check(rows)
        print(f"{name}: {len(rows)} conversations, rendered tokens min {min(lens)} mean {sum(lens) / len(lens):.1f} max {max(lens)}")
    print(f"vocab {cfg.vocab_size}, special ids", {t: tok.convert_tokens_to_ids(t) for t in SPECIALS})


if __name__ == "__main__":
    main()
