"""Labels come from the message structure: every assistant token and its end-of-turn token are trained, nothing else."""

import copy

import pytest
import torch

from dtrain.config.schema import DataFormat, TrainOn
from dtrain.data import IGNORE_INDEX, ChatRenderer, DataError, collate
from dtrain.data.formats import to_messages
from dtrain.data.sources import RawRecord

SINGLE = [{"role": "user", "content": "upper: abc"}, {"role": "assistant", "content": "ABC"}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "reverse: abc"},
    {"role": "assistant", "content": "cba"},
    {"role": "user", "content": "upper: xy"},
    {"role": "assistant", "content": "XY"},
]


def trained_text(renderer: ChatRenderer, example) -> list[str]:
    """The trained tokens, decoded one by one (special tokens kept)."""
    tok = renderer.tokenizer
    return [tok.decode([t]) for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]


def expected_trained(tok, messages, turns) -> list[str]:
    eot = tok.eos_token
    out = []
    for i in turns:
        out += [tok.decode([t]) for t in tok(messages[i]["content"], add_special_tokens=False)["input_ids"]] + [eot]
    return out


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single_turn", "multi_turn_with_system"])
def test_every_assistant_token_and_its_end_token_and_nothing_else(tiny_tokenizer, messages):
    renderer = ChatRenderer(tiny_tokenizer, TrainOn.assistant)
    example = renderer.render(messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert trained_text(renderer, example) == expected_trained(tiny_tokenizer, messages, turns)
    # Labels are the input ids themselves where trained (unshifted, HF convention).
    for t, label in zip(example.input_ids, example.labels):
        assert label in (IGNORE_INDEX, t)
    assert (
        example.input_ids
        == tiny_tokenizer(tiny_tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    )


def test_end_of_turn_token_trained_exactly_once_per_turn(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer, TrainOn.assistant)
    example = renderer.render(MULTI)
    eot = tiny_tokenizer.convert_tokens_to_ids(tiny_tokenizer.eos_token)
    trained_eots = sum(1 for label in example.labels if label == eot)
    all_eots = example.input_ids.count(eot)
    assert trained_eots == 2  # one per assistant turn
    assert all_eots == 5  # system, user, assistant, user, assistant each end with one; only assistants' are trained


def test_last_assistant_and_all_strategies(tiny_tokenizer):
    last = ChatRenderer(tiny_tokenizer, TrainOn.last_assistant).render(MULTI)
    assert trained_text(ChatRenderer(tiny_tokenizer, TrainOn.last_assistant), last) == expected_trained(tiny_tokenizer, MULTI, [4])
    everything = ChatRenderer(tiny_tokenizer, TrainOn.all).render(MULTI)
    assert everything.labels == everything.input_ids


def test_pad_equal_to_eos_still_trains_the_final_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    renderer = ChatRenderer(tok, TrainOn.assistant)
    short, long = renderer.render(SINGLE), renderer.render(MULTI)
    batch = collate([short, long], pad_token_id=tok.pad_token_id)
    eos = tok.eos_token_id
    row = batch["labels"][0]
    n = len(short.input_ids)
    assert int(row[n - 2]) == eos  # the assistant's closing EOS (a "\n" follows it in ChatML) is a target
    assert (row[n:] == IGNORE_INDEX).all()  # padding (same id as EOS) is masked by position
    assert (batch["input_ids"][0, n:] == eos).all()
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert torch.equal(batch["labels"][1], torch.tensor(long.labels))


def test_alpaca_records_become_user_assistant_turns(tiny_tokenizer):
    record = RawRecord("x.jsonl:3", {"instruction": "upper:", "input": "abc", "output": "ABC"})
    messages = to_messages(record, DataFormat.alpaca)
    assert messages == [{"role": "user", "content": "upper:\n\nabc"}, {"role": "assistant", "content": "ABC"}]
    example = ChatRenderer(tiny_tokenizer, TrainOn.assistant).render(messages)
    assert trained_text(ChatRenderer(tiny_tokenizer, TrainOn.assistant), example) == list("ABC") + [tiny_tokenizer.eos_token]


def test_template_without_end_token_is_refused(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="never learn to stop"):
        ChatRenderer(tok, TrainOn.assistant).render(SINGLE, "s.jsonl:1")


def test_config_chat_template_wins_over_the_tokenizers(tiny_tokenizer, tmp_path):
    from dtrain.data import resolve_chat_template

    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] | upper }}: {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>ASSISTANT: {% endif %}"
    )
    path = tmp_path / "t.jinja"
    path.write_text(template)
    for override in (template, str(path)):
        tok = copy.deepcopy(tiny_tokenizer)
        resolve_chat_template(tok, override)
        example = ChatRenderer(tok, TrainOn.assistant).render(SINGLE)
        assert tok.decode(example.input_ids).startswith("<|im_start|>USER: upper: abc<|im_end|><|im_start|>ASSISTANT: ABC")
        assert trained_text(ChatRenderer(tok, TrainOn.assistant), example) == list("ABC") + [tok.eos_token]


def test_missing_template_is_a_clear_error(tiny_tokenizer):
    from dtrain.data import resolve_chat_template

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match="data.chat_template"):
        resolve_chat_template(tok, None)


def test_double_bos_is_refused(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "<|endoftext|><|endoftext|>" + tok.chat_template
    with pytest.raises(DataError, match="two BOS"):
        ChatRenderer(tok, TrainOn.assistant).render(SINGLE)
