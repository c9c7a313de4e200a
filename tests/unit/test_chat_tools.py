"""Tool calling under published templates (tests/assets/chat_templates/SOURCES.md): every trained turn is the call
or answer exactly as the template writes it after its generation prompt, through the end-of-turn token; tool
results, schemas, system and user text are never trained; arguments reach each template in the form it renders
without re-encoding; templates that raise or leave out calls and results make the record invalid (counted under
data.on_invalid=skip); reasoning fields and per-message ``train`` flags; plain (template-free) conversations."""

import json
from collections import Counter
from pathlib import Path

import pytest

from dtrain.config.schema import DataConfig, OnInvalid, TrainOn
from dtrain.data import IGNORE_INDEX, ChatRenderer, DataError, prepare_data, resolve_chat_template
from dtrain.data.audit import audit_masks
from dtrain.data.chat import REASONING_IGNORED, TEMPLATE_DROPS, TEMPLATE_MOVES, ChatTemplateError, TemplateCannotRender
from dtrain.data.conversation import Conversation
from dtrain.data.dataset import TEMPLATE_REFUSED
from dtrain.data.template_checks import AS_GIVEN, OBJECT

from tests.unit.test_chat_templates import trained_spans

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "chat_templates"
SOURCE = "tools.jsonl:7"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {what} in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}}, "required": ["city"]},
        },
    }
    for name, what in (("get_weather", "weather"), ("get_time", "time"))
]


def call(name: str, city: str, call_id: str, as_string: bool = False) -> dict:
    arguments = {"city": city}
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments) if as_string else arguments}}


def calls(*tool_calls, content=None) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": list(tool_calls)}


def result(call_id: str, content: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def single(as_string=False, content=None, tool_result='{"temp": 21}') -> list[dict]:
    return [
        {"role": "user", "content": "Weather in Paris?"},
        calls(call("get_weather", "Paris", "call00001", as_string), content=content),
        result("call00001", tool_result),
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ]


PARALLEL = [
    {"role": "user", "content": "Weather in Paris and in Rome?"},
    calls(call("get_weather", "Paris", "call00001"), call("get_weather", "Rome", "call00002")),
    result("call00001", '{"temp": 21}'),
    result("call00002", '{"temp": 25}'),
    {"role": "assistant", "content": "Paris has 21 degrees, Rome 25."},
]
MULTI_STEP = [  # two rounds of calls, then a follow-up answered without tools
    {"role": "user", "content": "What time is it in the city with 21 degrees?"},
    calls(call("get_weather", "Paris", "call00001")),
    result("call00001", '{"temp": 21}'),
    calls(call("get_time", "Paris", "call00003"), content=""),
    result("call00003", '{"time": "12:00"}'),
    {"role": "assistant", "content": "It is noon in Paris."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
CONVERSATIONS = {"single": single(), "parallel": PARALLEL, "multi_step": MULTI_STEP}

# (template, tokenizer family): the templates that render tool calls and results.
TEMPLATES = {
    "qwen2.5": "qwen",
    "qwen3": "qwen",
    "hermes3_tool_use": "qwen",
    "llama3.1": "llama3",
    "mistral_nemo": "mistral_nemo",
}


def load(template: str, family: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / family)
    resolve_chat_template(tok, str(ASSETS / f"{template}.jinja"))
    return tok


def special_ids(tok) -> set[int]:
    return {i for i, t in tok.added_tokens_decoder.items() if t.special}


def templated(renderer: ChatRenderer, messages: list[dict]) -> list[dict]:
    """The messages in the form this template takes calls (as the renderer gives them): no train flags."""
    forms = renderer._call_forms
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if k != "train"}
        if m.get("tool_calls"):
            m["content"] = m["content"] if m["content"] is not None else forms.null_content
            if forms.arguments == OBJECT:
                m["tool_calls"] = [_as_object(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def _as_object(tool_call: dict) -> dict:
    arguments = tool_call["function"]["arguments"]
    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    return {**tool_call, "function": {**tool_call["function"], "arguments": arguments}}


def template_turn(tok, messages: list[dict], i: int, eot: str) -> str:
    """What the template itself writes for message ``i`` after its generation prompt, through the end-of-turn token
    that closes it (the render that ends with the turn, after the prompt's own opening)."""
    render = lambda n, gp=False: tok.apply_chat_template(messages[:n], tools=TOOLS, tokenize=False, add_generation_prompt=gp)
    own, prompt, head = render(i + 1), render(i, True), render(i)
    start = len(prompt) if own.startswith(prompt) else own.rfind(prompt[len(head) :]) + len(prompt) - len(head)
    return own[start : own.rfind(eot) + len(eot)]


@pytest.mark.parametrize("train_on", [TrainOn.assistant, TrainOn.last_assistant], ids=lambda t: t.value)
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_trained_turns_are_the_calls_and_answers_the_template_writes(template, name, train_on):
    tok = load(template, TEMPLATES[template])
    renderer = ChatRenderer(tok, train_on)
    conversation = Conversation(CONVERSATIONS[name], TOOLS)
    if template == "llama3.1" and name == "parallel":
        with pytest.raises(ChatTemplateError, match=f"{SOURCE}: .*only supports single tool-calls"):
            renderer.render_examples(conversation, SOURCE)
        return
    examples = renderer.render_examples(conversation, SOURCE)
    messages = templated(renderer, conversation.messages)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = assistant if train_on == TrainOn.assistant else assistant[-1:]
    per_example = [trained] if len(examples) == 1 else [[i] for i in trained]
    assert len(per_example) == len(examples)
    eot_id = renderer.end_of_turn_id
    tool_texts = [m["content"] for m in messages if m["role"] == "tool"]
    for example, turns in zip(examples, per_example):
        spans = trained_spans(example)
        decoded = [tok.decode(span) for span in spans]
        assert decoded == [template_turn(tok, messages, i, renderer.end_of_turn_token) for i in turns]
        for span in spans:
            assert span[-1] == eot_id and not special_ids(tok) & set(span[:-1]) - {tok.convert_tokens_to_ids("[TOOL_CALLS]")}
        assert not any(text in d for text in tool_texts for d in decoded)  # results are never trained
        assert not any("Weather in" in d or "Thanks!" in d or "The weather in a city" in d for d in decoded)
        for i in turns:  # generation sees the tokens training saw before each turn (per-turn examples included)
            prompt = renderer.render_prompt(Conversation(conversation.messages[:i], TOOLS))
            assert example.input_ids[: len(prompt)] == prompt and example.labels[len(prompt)] != IGNORE_INDEX
    assert audit_masks(examples, renderer, seed=0) == len(examples)


def test_qwen25_trains_the_exact_call_text_and_end_token():
    tok = load("qwen2.5", "qwen")
    example = ChatRenderer(tok, TrainOn.assistant).render(Conversation(single(), TOOLS), SOURCE)
    assert [tok.decode(s) for s in trained_spans(example)] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 degrees in Paris.<|im_end|>",
    ]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_arguments_as_strings_or_objects_render_as_json_never_quoted_twice(template):
    tok = load(template, TEMPLATES[template])
    renderer = ChatRenderer(tok, TrainOn.assistant)
    as_object = renderer.render_examples(Conversation(single(), TOOLS), SOURCE)
    as_string = renderer.render_examples(Conversation(single(as_string=True), TOOLS), SOURCE)
    call_text = tok.decode(trained_spans(as_string[0])[0])
    assert '"city": "Paris"' in call_text and '\\"city\\"' not in call_text
    if renderer._call_forms.arguments == OBJECT:  # it serialises them itself: a string is handed over parsed
        assert [e.input_ids for e in as_string] == [e.input_ids for e in as_object]
    # Qwen2.5, Llama-3.1 and Mistral write `arguments | tojson`; Qwen3 and Hermes write a string as it is.
    assert renderer._call_forms.arguments == (AS_GIVEN if template in ("qwen3", "hermes3_tool_use") else OBJECT)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_null_and_empty_content_of_a_call_turn_train_the_same(template):
    tok = load(template, TEMPLATES[template])
    renderer = ChatRenderer(tok, TrainOn.assistant)
    null = renderer.render_examples(Conversation(single(content=None), TOOLS), SOURCE)
    empty = renderer.render_examples(Conversation(single(content=""), TOOLS), SOURCE)
    assert [(e.input_ids, e.labels) for e in null] == [(e.input_ids, e.labels) for e in empty]


def test_text_content_next_to_a_call_is_trained_with_it():
    tok = load("qwen2.5", "qwen")
    example = ChatRenderer(tok, TrainOn.assistant).render(Conversation(single(content="Let me look."), TOOLS), SOURCE)
    assert tok.decode(trained_spans(example)[0]).startswith('Let me look.\n<tool_call>\n{"name": "get_weather"')


@pytest.mark.parametrize("template", ["qwen2.5", "hermes3_tool_use", "mistral_nemo", "llama3.1"])
def test_a_tool_result_that_spells_special_tokens_stays_text(template):
    tok = load(template, TEMPLATES[template])
    renderer = ChatRenderer(tok, TrainOn.assistant)
    spelled = " ".join(sorted(t.content for t in tok.added_tokens_decoder.values() if t.special))
    benign = renderer.render_examples(Conversation(single(), TOOLS), SOURCE)
    tricky = renderer.render_examples(Conversation(single(tool_result=f"temp 21 {spelled} done"), TOOLS), SOURCE)
    count = lambda ids: Counter(t for t in ids if t in special_ids(tok))
    assert [count(e.input_ids) for e in tricky] == [count(e.input_ids) for e in benign]
    assert [[tok.decode(s) for s in trained_spans(e)] for e in tricky] == [[tok.decode(s) for s in trained_spans(e)] for e in benign]


def test_special_tokens_spelled_in_arguments_stay_text():
    tok = load("qwen2.5", "qwen")
    renderer = ChatRenderer(tok, TrainOn.assistant)
    messages = single()
    messages[1] = calls(call("get_weather", "Paris<|im_end|><|im_start|>", "call00001"))
    example = renderer.render(Conversation(messages, TOOLS), SOURCE)
    first = trained_spans(example)[0]
    assert first.count(renderer.end_of_turn_id) == 1 and first[-1] == renderer.end_of_turn_id
    assert '"city": "Paris<|im_end|><|im_start|>"' in tok.decode(first)


def test_qwen3_trains_reasoning_it_renders_and_qwen25_counts_it_ignored():
    messages = single()
    messages[-1] = {**messages[-1], "reasoning_content": "The tool says 21."}
    qwen3 = load("qwen3", "qwen")
    notes = Counter()
    examples = ChatRenderer(qwen3, TrainOn.last_assistant).render_examples(Conversation(messages, TOOLS), SOURCE, notes)
    answer = "<think>\nThe tool says 21.\n</think>\n\nIt is 21 degrees in Paris.<|im_end|>"
    assert [qwen3.decode(s) for s in trained_spans(examples[0])] == [answer]
    assert not notes
    qwen25 = load("qwen2.5", "qwen")
    renderer = ChatRenderer(qwen25, TrainOn.assistant)
    with_reasoning = renderer.render_examples(Conversation(messages, TOOLS), SOURCE, notes)
    assert notes == Counter({REASONING_IGNORED: 1})
    assert [e.labels for e in with_reasoning] == [e.labels for e in renderer.render_examples(Conversation(single(), TOOLS), SOURCE)]


def test_train_flags_override_train_on_per_message():
    tok = load("qwen2.5", "qwen")
    messages = single()
    messages[1] = {**messages[1], "train": False}
    messages[0] = {**messages[0], "train": True}
    example = ChatRenderer(tok, TrainOn.assistant).render(Conversation(messages, TOOLS), SOURCE)
    assert [tok.decode(s) for s in trained_spans(example)] == ["Weather in Paris?<|im_end|>", "It is 21 degrees in Paris.<|im_end|>"]
    messages = single()
    messages[1] = {**messages[1], "train": True}
    example = ChatRenderer(tok, TrainOn.last_assistant).render(Conversation(messages, TOOLS), SOURCE)
    assert len(trained_spans(example)) == 2 and tok.decode(trained_spans(example)[0]).startswith("<tool_call>")


@pytest.mark.parametrize(
    ("template", "family", "dropped"),
    [
        # Granite-3.0 renders calls only as role assistant_tool_call and results only as tool_response.
        ("granite3.0", "granite", "the call to 'get_weather' in message 1, the result in tool message 2"),
        # DeepSeek-R1-distill writes calls only where content is null (transformers hands the template no null key).
        ("deepseek_r1_distill", "deepseek_r1", "the call to 'get_weather' in message 1"),
    ],
)
def test_a_template_that_leaves_out_calls_or_results_refuses_the_record(template, family, dropped):
    tok = load(template, family)
    with pytest.raises(TemplateCannotRender, match=f"{SOURCE}: {TEMPLATE_DROPS} .*does not render {dropped};") as caught:
        ChatRenderer(tok, TrainOn.assistant).render_examples(Conversation(single(), TOOLS), SOURCE)
    assert caught.value.reason == TEMPLATE_DROPS


def test_mistral_refuses_call_ids_that_are_not_nine_characters():
    tok = load("mistral_nemo", "mistral_nemo")
    messages = single()
    messages[1] = calls(call("get_weather", "Paris", "call1"))
    with pytest.raises(ChatTemplateError, match=f"{SOURCE}: the chat template refused this conversation: Tool call IDs should be"):
        ChatRenderer(tok, TrainOn.assistant).render_examples(Conversation(messages, TOOLS), SOURCE)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_the_template_cannot_render_are_counted_invalid_or_stop_with_their_line(tmp_path):
    tok = load("mistral_nemo", "mistral_nemo")
    good = {"messages": single(), "tools": TOOLS}
    with_system = {"messages": [{"role": "system", "content": "Be brief."}, *single()[:1], {"role": "assistant", "content": "Sunny."}]}
    bad_id = {"messages": [single()[0], calls(call("get_weather", "Paris", "call1")), result("call1", "21"), single()[3]]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, with_system, good, bad_id, good])
    renderer = ChatRenderer(tok, TrainOn.assistant)
    cfg = dict(path=str(path), eval_fraction=0.0, cache_dir="", num_proc=1)
    with pytest.raises(DataError, match=f"{path}:2: {TEMPLATE_MOVES} .*drops or moves part of the conversation"):
        prepare_data(DataConfig(**cfg), renderer, seed=0, num_prompts=0)
    data = prepare_data(DataConfig(**cfg, on_invalid=OnInvalid.skip, max_invalid_fraction=0.5), renderer, seed=0, num_prompts=0)
    assert data.dropped == Counter({f"invalid: {TEMPLATE_MOVES}": 1, f"invalid: {TEMPLATE_REFUSED}": 1})
    assert [e.source for e in data.train] == [f"{path}:1", f"{path}:3", f"{path}:5"]


def test_prepared_prompts_keep_tools_and_count_ignored_reasoning(tmp_path):
    tok = load("qwen2.5", "qwen")
    messages = single()
    messages[-1] = {**messages[-1], "reasoning_content": "The tool says 21."}
    record = {"messages": messages, "tools": json.dumps(TOOLS), "chat_template_kwargs": {"unused": True}}
    path = write_jsonl(tmp_path / "d.jsonl", [record, {"messages": single(as_string=True), "tools": TOOLS}])
    renderer = ChatRenderer(tok, TrainOn.assistant)
    data = prepare_data(DataConfig(path=str(path), eval_path=str(path), cache_dir="", num_proc=1), renderer, seed=0, num_prompts=2)
    assert data.notes == Counter({REASONING_IGNORED: 2})  # each record once, in train and in eval
    prompt = data.prompts[0]
    assert prompt.tools == TOOLS and prompt.template_kwargs == {"unused": True} and prompt.reference == "It is 21 degrees in Paris."
    ids = renderer.render_prompt(prompt.conversation)
    assert list(data.eval[0].input_ids[: len(ids)]) == ids and data.eval[0].labels[len(ids)] != IGNORE_INDEX


def test_a_plain_conversation_is_its_text_and_eos_without_template():
    tok = load("qwen2.5", "qwen")
    renderer = ChatRenderer(tok, TrainOn.assistant)
    conversation = Conversation(segments=[("Question: 2+2? <|im_end|>", False), (" Answer: 4", True)])
    example = renderer.render(conversation, SOURCE)
    assert example.input_ids[-1] == tok.eos_token_id and not special_ids(tok) & set(example.input_ids[:-1])
    assert tok.decode(example.input_ids) == "Question: 2+2? <|im_end|> Answer: 4" + tok.eos_token
    assert [tok.decode(s) for s in trained_spans(example)] == [" Answer: 4" + tok.eos_token]
    everything = ChatRenderer(tok, TrainOn.assistant).render(Conversation(segments=[("All of it.", True)]), SOURCE)
    assert everything.labels == everything.input_ids
    assert audit_masks([example, everything], renderer, seed=0) == 2


def test_mistral_moving_its_tool_list_to_the_last_user_message_trains_each_turn_after_its_own_prompt():
    tok = load("mistral_nemo", "mistral_nemo")
    renderer = ChatRenderer(tok, TrainOn.assistant)
    examples = renderer.render_examples(Conversation(MULTI_STEP, TOOLS), SOURCE)
    assert [e.source for e in examples] == [f"{SOURCE}#turn{k}" for k in range(1, 5)]
    for example in examples:  # each example's only user message before its turn carries [AVAILABLE_TOOLS]
        text = tok.decode(example.input_ids)
        assert text.count("[AVAILABLE_TOOLS]") == 1 and text.index("[AVAILABLE_TOOLS]") < text.rindex("[INST]")


def test_template_kwargs_reach_the_template():
    tok = load("qwen3", "qwen")
    renderer = ChatRenderer(tok, TrainOn.assistant)
    messages = [{"role": "user", "content": "Hi"}]
    thinking_off = renderer.render_prompt(Conversation(messages, template_kwargs={"enable_thinking": False}))
    assert tok.decode(thinking_off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(renderer.render_prompt(Conversation(messages))).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("template, family", list(TEMPLATES.items()))
def test_prefix_renders_equal_apply_chat_template_and_take_the_prepared_path(template, family):
    """``Renders`` prepares a conversation once and renders its prefixes through the compiled template: every prefix,
    with and without the generation prompt, must be exactly what ``apply_chat_template`` writes (tools, reasoning,
    null content, template arguments included)."""
    from dtrain.data.template_text import Renders

    tok = load(template, family)
    reasoning = [*MULTI_STEP[:-1], {"role": "assistant", "content": "You are welcome.", "reasoning_content": "Be polite."}]
    for messages in [*CONVERSATIONS.values(), reasoning]:
        messages = [{**m, "content": m["content"] or ""} for m in messages] if template == "qwen3" else messages
        renders, refused = Renders(tok, messages, SOURCE, TOOLS, {"enable_thinking": False}), []
        for n in range(len(messages), 0, -1):
            for prompt in (False, True):
                try:
                    want = tok.apply_chat_template(
                        messages[:n], tools=TOOLS, tokenize=False, add_generation_prompt=prompt, enable_thinking=False
                    )
                except Exception:  # a prefix the template refuses on its own (Mistral: a tool result must follow a call)
                    with pytest.raises(ChatTemplateError):
                        renders(n, prompt)
                    refused.append((n, prompt))
                    continue
                assert renders(n, prompt) == want, (template, n, prompt)
        if (len(messages), False) not in refused:  # a whole the template renders: checked, then the prepared path taken
            assert renders._prefix_render is not None, template
