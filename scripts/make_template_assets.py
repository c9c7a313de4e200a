"""Build the small tokenizers that tests/unit/test_chat_templates.py renders the published chat templates with.

    python scripts/make_template_assets.py            # writes tests/assets/chat_templates/tokenizers/<family>/

Each family gets a tokenizer of the kind its model uses (byte-level BPE, or SentencePiece-style BPE with the ``▁``
space marker and byte fallback), that model family's special tokens, and bos/eos/pad/unk as the real model sets them
(Granite's unk, pad and bos are its eos; Llama-2, Llama-3.1 and Mistral have no pad). The vocabularies are tiny:
merges are learned from the short corpus below by a plain BPE trainer written here, so that the output is the same
on every run (the ``tokenizers`` trainer breaks ties in hash order). The corpus repeats newline and indentation runs,
so the byte-level tokenizers merge ``"\\n\\n"`` and ``"\\n\\n\\n"`` into single tokens: a header's ``"\\n"`` followed
by an answer that starts with ``"\\n\\n"`` then tokenises differently as a whole than in pieces, which is the case
the renderer must survive. Tokenizers are saved with ``tokenizer_class: TokenizersBackend`` so that transformers
loads ``tokenizer.json`` as written.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

OUT = Path(__file__).resolve().parents[1] / "tests" / "assets" / "chat_templates" / "tokenizers"
NUM_MERGES = 300

# Qwen2/DeepSeek-distill, Llama-3 (tiktoken cl100k-like) and GPT-2/Granite pre-tokenizer regexes, as the models publish them.
QWEN_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the question, and be brief.",
    "The user asked a question; the assistant gave an answer.",
    "Here is an indented answer:\n\n  first line\n  second line\n\n    deeper\n\n\nDone.",
    "def reverse(text):\n    return text[::-1]\n\n\nprint(reverse('abc'))",
    "Let me think about it step by step.\n\nFirst, add the numbers. Then check the result.",
    "A list:\n\n- one\n- two\n\n  - nested\n\n\n",
    "It is 42. The answer is forty-two, and that is the final answer.",
    "Translate to French: good morning. Bonjour!",
    "system user assistant model the answer question reasoning think",
    "\n\n\n\n  \n\n  \n\n\n  indented\n\n  indented answer\n\n\n",
]
CORPUS = "\n\n".join(CORPUS_LINES * 3)


@dataclass
class Family:
    """One tokenizer family: its kind, its special tokens and which of them the model uses as bos/eos/pad/unk."""

    kind: str  # "byte_bpe" | "sentencepiece"
    special: list[str]
    bos: Optional[str]
    eos: Optional[str]
    pad: Optional[str]
    unk: Optional[str]
    split: str = QWEN_SPLIT  # byte_bpe only
    text_tokens: list[str] = field(default_factory=list)  # added tokens that are not special (e.g. <think>)
    prefix_space: bool = True  # sentencepiece only: the "▁" Llama prepends at the start of the input (Gemma: none)


FAMILIES = {
    # meta-llama/Llama-2-7b-chat-hf: <unk>/<s>/</s> are ids 0/1/2, no pad.
    "llama2": Family("sentencepiece", ["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad=None, unk="<unk>"),
    # meta-llama/Llama-3.1-8B-Instruct: eos is <|eot_id|>, no pad, no unk.
    "llama3": Family(
        "byte_bpe",
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|finetune_right_pad_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,
        unk=None,
        split=LLAMA3_SPLIT,
    ),
    # mistralai/Mistral-Nemo-Instruct-2407 (Tekken, byte-level): [INST]/[/INST] and the tool markers are special.
    "mistral_nemo": Family(
        "byte_bpe",
        [
            "<unk>",
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
            "[TOOL_CALLS]",
        ],
        bos="<s>",
        eos="</s>",
        pad=None,
        unk="<unk>",
        split=LLAMA3_SPLIT,
    ),
    # google/gemma-2-2b-it and google/gemma-3-*-it: turns end with <end_of_turn>, the eos is <eos>; no "▁" prefix.
    "gemma": Family(
        "sentencepiece",
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        prefix_space=False,
    ),
    # Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen3-0.6B (and ChatML): eos <|im_end|>, pad <|endoftext|>, no bos; <think> is text.
    "qwen": Family(
        "byte_bpe",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        text_tokens=["<tool_call>", "</tool_call>", "<think>", "</think>"],
    ),
    # microsoft/Phi-3.5-mini-instruct: Llama's SentencePiece with chat tokens; eos and pad are <|endoftext|>.
    "phi3": Family(
        "sentencepiece",
        ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        unk="<unk>",
    ),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-32B: Qwen's byte-level BPE with DeepSeek's markers; pad is the eos.
    "deepseek_r1": Family(
        "byte_bpe",
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<|EOT|>", "<｜tool▁calls▁begin｜>"],
        bos="<｜begin▁of▁sentence｜>",
        eos="<｜end▁of▁sentence｜>",
        pad="<｜end▁of▁sentence｜>",
        unk=None,
        text_tokens=["<think>", "</think>"],
    ),
    # ibm-granite/granite-3.3-2b-instruct: GPT-2 byte-level BPE whose bos, eos, pad and unk are all <|end_of_text|>.
    "granite": Family(
        "byte_bpe",
        ["<|end_of_text|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"],
        bos="<|end_of_text|>",
        eos="<|end_of_text|>",
        pad="<|end_of_text|>",
        unk="<|end_of_text|>",
        split="gpt2",
    ),
}


def learn_merges(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on ``{word (tuple of symbols): count}``; ties go to the smallest pair, so the result is reproducible."""
    words = Counter({tuple(w): n for w, n in words.items()})
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def byte_bpe(family: Family) -> Tokenizer:
    if family.split == "gpt2":
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(family.split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(CORPUS))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort(key=lambda ch: ch.encode("utf-8"))
    merges = learn_merges(words, NUM_MERGES)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece(family: Family) -> Tokenizer:
    # Words for learning merges: "▁"-marked like SentencePiece, split at spaces only for the statistics.
    train_pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    words = Counter(piece for piece, _ in train_pre.pre_tokenize_str(CORPUS))
    chars = sorted({ch for word in words for ch in word})
    vocab = {token: i for i, token in enumerate(family.special)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    merges = learn_merges(words, NUM_MERGES)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=family.unk, byte_fallback=True, fuse_unk=True))
    if family.prefix_space:  # Llama (transformers' LlamaTokenizer): "▁" prepended at the start of the input only
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:  # Gemma: spaces become "▁", nothing is prepended
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    # No Strip decoder: a decoded span keeps its leading space, so tests can compare it with the rendered text.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def build(name: str, family: Family, out: Path) -> None:
    tok = byte_bpe(family) if family.kind == "byte_bpe" else sentencepiece(family)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.text_tokens])
    folder = out / name
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "TokenizersBackend",
        "bos_token": family.bos,
        "eos_token": family.eos,
        "pad_token": family.pad,
        "unk_token": family.unk,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    for name, family in FAMILIES.items():
        build(name, family, OUT)
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {len(FAMILIES)} tokenizers to {OUT} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
