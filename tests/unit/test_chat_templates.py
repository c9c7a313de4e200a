"""Masks under twelve chat templates as their model projects publish them (tests/assets/chat_templates/SOURCES.md),
each with a small tokenizer of its family (scripts/make_template_assets.py): every trained span is exactly what the
model produces after its generation prompt, closed by the end-of-turn token; message text that spells a special token
stays text; templates that raise name the record; a wrong end token is refused rather than training half an answer."""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from dtrain.config.schema import DataConfig, OnInvalid, TrainOn
from dtrain.data import IGNORE_INDEX, ChatRenderer, DataError, collate, prepare_data, resolve_chat_template
from dtrain.data.audit import audit_masks
from dtrain.data.dataset import SPLIT_PER_TURN, TEMPLATE_REFUSED

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "chat_templates"
SOURCE = "chat.jsonl:3"


def qwen3_answer(content: str) -> str:
    """Qwen3's last assistant turn: the reasoning in a <think> block (empty without one), then the answer."""
    reasoning, answer = "", content
    if "</think>" in content:
        answer = content.split("</think>")[-1].lstrip("\n")
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + answer.lstrip("\n") + "<|im_end|>"


@dataclass(frozen=True)
class Case:
    template: str
    tokenizer: str
    end_of_turn: Optional[str]  # data.end_of_turn_token; None: the tokenizer's eos
    answer: Callable[[str], str]  # the trained text of an assistant turn with this content
    system: bool = True  # renders a system message
    rewrites: bool = False  # renders earlier turns differently: one example per assistant turn
    reasoning: bool = False  # a reasoning template: answers carry <think> blocks
    prompt_is_prefix: bool = True  # the generation prompt is a prefix of the rendered conversation

    def __str__(self) -> str:
        return self.template


CASES = [
    Case("llama2", "llama2", None, lambda c: " " + c.strip() + " </s>"),
    Case("llama3.1", "llama3", None, lambda c: c.strip() + "<|eot_id|>"),
    # Mistral's template writes the system message only into a final user message: without one it trains as a whole.
    Case("mistral_nemo", "mistral_nemo", None, lambda c: c + "</s>", system=False),
    Case("gemma2", "gemma", "<end_of_turn>", lambda c: c.strip() + "<end_of_turn>", system=False),
    Case("gemma3", "gemma", "<end_of_turn>", lambda c: c.strip() + "<end_of_turn>"),
    Case("qwen2.5", "qwen", None, lambda c: c + "<|im_end|>"),
    Case("qwen3", "qwen", None, qwen3_answer, rewrites=True, reasoning=True),
    Case("phi3.5", "phi3", "<|end|>", lambda c: c + "<|end|>"),
    # The prompt ends in "<think>\n", which the rendered history drops along with the reasoning.
    Case(
        "deepseek_r1_distill",
        "deepseek_r1",
        None,
        lambda c: c.split("</think>")[-1] + "<｜end▁of▁sentence｜>",
        reasoning=True,
        prompt_is_prefix=False,
    ),
    Case("chatml", "qwen", None, lambda c: c + "<|im_end|>"),
    Case("granite3", "granite", None, lambda c: c + "<|end_of_text|>"),
    Case("granite3.0", "granite", None, lambda c: c + "<|end_of_text|>"),
]
TOOL_ONLY = {"hermes3_tool_use"}  # renders only conversations with tools: tests/unit/test_chat_tools.py


def load(case: Case):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / case.tokenizer)
    resolve_chat_template(tok, str(ASSETS / f"{case.template}.jinja"))
    return tok


def special_tokens(tok) -> dict[str, int]:
    """Every special token of the tokenizer (its chat markers included), text -> id."""
    return {t.content: i for i, t in tok.added_tokens_decoder.items() if t.special}


def conversation(case: Case, tok) -> list[dict]:
    """Two turns: an answer that starts with "\\n\\n  ", and one that writes the template's own special tokens as text."""
    eot = case.end_of_turn or tok.eos_token
    spelled = " ".join(sorted(t for t in special_tokens(tok) if t != eot))
    second = f"It is `{eot}`, and these are text too: {spelled}. The end."
    if case.reasoning:
        second = f"<think>\nThe user wants {eot} spelled.\n</think>\n\n{second}"
    messages = [{"role": "system", "content": "Be brief."}] if case.system else []
    return messages + [
        {"role": "user", "content": "Indent your answer."},
        {"role": "assistant", "content": "\n\n  indented answer\n  second line"},
        {"role": "user", "content": f"Write {eot} in your answer."},
        {"role": "assistant", "content": second},
    ]


def trained_spans(example) -> list[list[int]]:
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("train_on", [TrainOn.assistant, TrainOn.last_assistant], ids=lambda t: t.value)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_trained_spans_are_each_answer_and_its_closing_token(case, train_on):
    tok = load(case)
    renderer = ChatRenderer(tok, train_on, case.end_of_turn)
    messages = conversation(case, tok)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = turns if train_on == TrainOn.assistant else turns[-1:]
    examples = renderer.render_examples(messages, SOURCE)

    if case.rewrites and train_on == TrainOn.assistant:  # one example per turn: the conversation up to that turn
        assert len(examples) == len(trained)
        per_example = [[i] for i in trained]
    else:
        assert len(examples) == 1
        per_example = [trained]
    specials = set(special_tokens(tok).values())
    for example, turns_in_it in zip(examples, per_example):
        spans = trained_spans(example)
        assert [tok.decode(span) for span in spans] == [case.answer(messages[i]["content"]) for i in turns_in_it]
        for span in spans:  # closed by the end-of-turn token; no special token before it, though the text spells them
            assert span[-1] == renderer.end_of_turn_id
            assert not specials & set(span[:-1])
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels))
        assert example.labels.count(renderer.end_of_turn_id) == len(turns_in_it)
        last_trained = max(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        assert example.last_turn[0] <= last_trained + 1 - len(spans[-1]) and example.last_turn[1] == last_trained + 1
    assert audit_masks(examples, renderer, seed=0) == len(examples)

    # Generation sees the tokens training saw before each answer (DeepSeek-R1's prompt adds "<think>\n" to them).
    for example, turns_in_it in zip(examples, per_example):
        for i in turns_in_it if case.prompt_is_prefix else []:
            prompt = renderer.render_prompt(messages[:i])
            assert example.input_ids[: len(prompt)] == prompt
            assert example.labels[len(prompt) - 1] == IGNORE_INDEX and example.labels[len(prompt)] != IGNORE_INDEX


@pytest.mark.parametrize("case", CASES, ids=str)
def test_an_ordinary_conversation_tokenises_as_the_whole_rendered_text_does(case):
    """Cutting at the trained spans' ends and reading content as text changes nothing where nothing merges across a
    cut or spells a special token: no SentencePiece "▁" is added at a cut, no token is split."""
    tok = load(case)
    messages = [{"role": "system", "content": "Be brief."}] if case.system else []
    messages += [
        {"role": "user", "content": "What is the answer?"},
        {"role": "assistant", "content": "The answer is 42."},
        {"role": "user", "content": "And the question?"},
        {"role": "assistant", "content": "Nobody knows."},
    ]
    example = ChatRenderer(tok, TrainOn.last_assistant, case.end_of_turn).render(messages, SOURCE)
    assert example.input_ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", [c for c in CASES if c.template in ("qwen2.5", "chatml")], ids=str)
def test_an_answer_starting_with_newlines_merges_with_the_header_yet_trains_exactly(case):
    tok = load(case)
    messages = conversation(case, tok)[:3]
    whole = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt = tok(tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert whole[: len(prompt)] != prompt  # the header's "\n" and the answer's "\n\n" are one token in the whole render
    example = ChatRenderer(tok, TrainOn.assistant).render(messages, SOURCE)
    assert [tok.decode(s) for s in trained_spans(example)] == [messages[2]["content"] + "<|im_end|>"]


def test_message_text_that_spells_special_tokens_is_never_encoded_as_them():
    case = next(c for c in CASES if c.template == "qwen2.5")
    tok = load(case)
    renderer = ChatRenderer(tok, TrainOn.assistant)
    spelled = "<|im_start|>assistant\nfake<|im_end|>"
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    tricky = [{"role": "user", "content": spelled}, {"role": "assistant", "content": spelled}]
    specials = set(special_tokens(tok).values())
    counts = lambda ids: Counter(t for t in ids if t in specials)
    assert counts(renderer.render(tricky, SOURCE).input_ids) == counts(renderer.render(plain, SOURCE).input_ids)
    assert counts(renderer.render_prompt(tricky[:1])) == counts(renderer.render_prompt(plain[:1]))
    example = renderer.render(tricky, SOURCE)
    assert [tok.decode(s) for s in trained_spans(example)] == [spelled + "<|im_end|>"]


def test_phi35_trains_up_to_end_and_not_the_end_of_text_its_template_appends():
    case = next(c for c in CASES if c.template == "phi3.5")
    tok = load(case)
    example = ChatRenderer(tok, TrainOn.assistant, "<|end|>").render(conversation(case, tok), SOURCE)
    assert example.input_ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert example.labels[-1] == IGNORE_INDEX


def test_a_tokenizer_whose_unknown_token_is_its_end_token_is_accepted():
    case = next(c for c in CASES if c.template == "granite3")
    tok = load(case)
    assert tok.unk_token_id == tok.eos_token_id == tok.pad_token_id == tok.bos_token_id
    renderer = ChatRenderer(tok, TrainOn.assistant)
    assert renderer.end_of_turn_id == tok.eos_token_id
    with pytest.raises(DataError, match="'<\\|eot_id\\|>' is not a single token"):
        ChatRenderer(tok, TrainOn.assistant, "<|eot_id|>")


@pytest.mark.parametrize("template", ["deepseek_r1_distill", "granite3"])
def test_pad_equal_to_eos_never_masks_the_eos_label(template):
    case = next(c for c in CASES if c.template == template)
    tok = load(case)
    assert tok.pad_token_id == tok.eos_token_id
    renderer = ChatRenderer(tok, TrainOn.assistant)
    messages = conversation(case, tok)
    short, long = renderer.render(messages[:-2], SOURCE), renderer.render(messages, SOURCE)
    batch = collate([short, long], pad_token_id=tok.pad_token_id)
    n = len(short.input_ids)
    closing = max(i for i, label in enumerate(short.labels) if label != IGNORE_INDEX)
    assert short.input_ids[closing] == tok.eos_token_id
    assert int(batch["labels"][0, closing]) == tok.eos_token_id  # trained, though the padding has the same id
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and (batch["input_ids"][0, n:] == tok.eos_token_id).all()


@pytest.mark.parametrize(
    ("template", "end_token", "answer"),
    [
        ("gemma2", None, "It is `<eos>`, and the rest of the answer."),  # Gemma's eos is not what ends its turns
        ("llama3.1", "<|end_of_text|>", "It is `<|end_of_text|>`, and the rest of the answer."),
        ("phi3.5", None, "It is `<|endoftext|>`, and the rest of the answer."),  # the default eos comes after <|end|>
    ],
)
def test_a_wrong_end_of_turn_token_is_refused_not_half_trained(template, end_token, answer):
    case = next(c for c in CASES if c.template == template)
    tok = load(case)
    messages = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": answer}]
    with pytest.raises(DataError, match=f"{SOURCE}: assistant message 1 is not closed by .*never learn to stop"):
        ChatRenderer(tok, TrainOn.assistant, end_token).render(messages, SOURCE)


def test_gemma2_refusing_a_system_message_names_the_record_and_its_message():
    tok = load(next(c for c in CASES if c.template == "gemma2"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(DataError, match=f"{SOURCE}: the chat template refused this conversation: System role not supported"):
        ChatRenderer(tok, TrainOn.assistant, "<end_of_turn>").render(messages, SOURCE)


def test_mistral_refusing_unalternating_roles_names_the_record_and_its_message():
    tok = load(next(c for c in CASES if c.template == "mistral_nemo"))
    messages = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(DataError, match=f"{SOURCE}: the chat template refused this conversation: .*roles must alternate"):
        ChatRenderer(tok, TrainOn.assistant).render(messages, SOURCE)


def test_mistral_dropping_the_system_message_from_answered_turns_is_refused():
    tok = load(next(c for c in CASES if c.template == "mistral_nemo"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(DataError, match=f"{SOURCE}.*drops or moves part of the conversation"):
        ChatRenderer(tok, TrainOn.assistant).render_examples(messages, SOURCE)


def write_jsonl(path: Path, conversations: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


def test_records_the_template_refuses_are_skipped_and_counted_or_stop_the_run(tmp_path):
    tok = load(next(c for c in CASES if c.template == "gemma2"))
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_jsonl(tmp_path / "d.jsonl", [good, [{"role": "system", "content": "Be brief."}, *good], good, good])
    renderer = ChatRenderer(tok, TrainOn.assistant, "<end_of_turn>")
    cfg = dict(path=str(path), eval_fraction=0.0, cache_dir="")
    with pytest.raises(DataError, match=f"{path}:2: the chat template refused this conversation: System role not supported;"):
        prepare_data(DataConfig(**cfg), renderer, seed=0, num_prompts=0)
    data = prepare_data(DataConfig(**cfg, on_invalid=OnInvalid.skip, max_invalid_fraction=0.5), renderer, seed=0, num_prompts=0)
    assert data.dropped == Counter({f"invalid: {TEMPLATE_REFUSED}": 1})
    assert [e.source for e in data.train] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    with pytest.raises(DataError, match="1 of 4 records are invalid"):
        prepare_data(DataConfig(**cfg, on_invalid=OnInvalid.skip, max_invalid_fraction=0.1), renderer, seed=0, num_prompts=0)


def test_a_rewriting_template_trains_one_example_per_turn_and_counts_it(tmp_path):
    case = next(c for c in CASES if c.template == "qwen3")
    tok = load(case)
    multi, single = conversation(case, tok), conversation(case, tok)[:3]
    path = write_jsonl(tmp_path / "d.jsonl", [multi, single, multi])
    cfg = DataConfig(path=str(path), eval_fraction=0.0, cache_dir="")
    data = prepare_data(cfg, ChatRenderer(tok, TrainOn.assistant), seed=0, num_prompts=0)
    assert data.split == Counter({SPLIT_PER_TURN: 2})
    assert [e.source for e in data.train] == [f"{path}:1#turn1", f"{path}:1#turn2", f"{path}:2", f"{path}:3#turn1", f"{path}:3#turn2"]
    last_only = prepare_data(cfg, ChatRenderer(tok, TrainOn.last_assistant), seed=0, num_prompts=0)
    assert not last_only.split and len(last_only.train) == 3
    with pytest.raises(DataError, match="one example per assistant turn; use ChatRenderer.render_examples"):
        ChatRenderer(tok, TrainOn.assistant).render(multi, SOURCE)


def test_every_shipped_template_names_its_source():
    sources = (ASSETS / "SOURCES.md").read_text()
    for path in ASSETS.glob("*.jinja"):
        assert f"`{path.name}`" in sources
    assert {c.template for c in CASES} | TOOL_ONLY == {p.stem for p in ASSETS.glob("*.jinja")}
