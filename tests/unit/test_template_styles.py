"""Masks under each train_on strategy for three chat-template styles: ChatML, Llama-3-like, and a
Llama-2-like template whose pad token equals its EOS. Only assistant content and each turn's end token
are trained (or everything with train_on=all); the end token is trained exactly once per trained turn."""

import copy

import pytest

from dtrain.config.schema import TrainOn
from dtrain.data import IGNORE_INDEX, ChatRenderer, collate

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "upper: ab"},
    {"role": "assistant", "content": "AB"},
    {"role": "user", "content": "upper: cd"},
    {"role": "assistant", "content": "CD"},
]

LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA2 = (
    "{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
)


def style(tokenizer, name):
    """(tokenizer, end-of-turn token, text each trained assistant turn must decode to)."""
    tok = copy.deepcopy(tokenizer)
    if name == "chatml":
        return tok, None, lambda content: content + "<|im_end|>"
    if name == "llama3":
        tok.add_special_tokens(
            {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
        )
        tok.chat_template = LLAMA3
        return tok, "<|eot_id|>", lambda content: content + "<|eot_id|>"
    tok.add_special_tokens({"eos_token": "</s>", "pad_token": "</s>"})  # pad == eos
    tok.chat_template = LLAMA2
    return tok, None, lambda content: " " + content + "</s>"


def trained_spans(tok, example):
    spans, current = [], []
    for t, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    return spans


@pytest.mark.parametrize("name", ["chatml", "llama3", "llama2_pad_is_eos"])
@pytest.mark.parametrize("train_on", list(TrainOn))
def test_masks_for_each_template_style(tiny_tokenizer, name, train_on):
    tok, eot, turn_text = style(tiny_tokenizer, name)
    example = ChatRenderer(tok, train_on, eot).render(CONVERSATION)
    if train_on == TrainOn.all:
        assert example.labels == example.input_ids
        return
    answers = ["AB", "CD"] if train_on == TrainOn.assistant else ["CD"]
    assert trained_spans(tok, example) == [turn_text(a) for a in answers]
    eot_id = tok.convert_tokens_to_ids(eot or tok.eos_token)
    assert sum(1 for label in example.labels if label == eot_id) == len(answers)
    if name == "llama2_pad_is_eos":  # padding after it is masked by position, the final EOS still trained
        batch = collate([example, ChatRenderer(tok, train_on, eot).render(CONVERSATION[:3])], tok.pad_token_id)
        short = batch["labels"][1]
        n = int(batch["attention_mask"][1].sum())
        assert int(short[n - 1]) == tok.eos_token_id and (short[n:] == IGNORE_INDEX).all()
