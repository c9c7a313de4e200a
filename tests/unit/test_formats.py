"""Record shapes: each is read into the same Conversation as its equivalent OpenAI ``messages`` record."""

import json

import pytest

from dtrain.config.schema import DataConfig, DataFormat, SourceConfig
from dtrain.data.conversation import Conversation
from dtrain.data.formats import detect_format, resolve_format, to_conversation
from dtrain.data.mixture import Source, data_sources
from dtrain.data.sources import InvalidRecord, RawRecord
from dtrain.errors import ConfigError, DataError

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {}}}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}}}
MAPPING = dict(messages_field="dialog", role_key="speaker", content_key="text", roles={"client": "user", "agent": "assistant"})


def source(fmt: DataFormat, **data) -> Source:
    """The one source of ``data.path`` with the given data settings (mapping, template arguments)."""
    (s,) = data_sources(DataConfig(path="x.jsonl", format=fmt, **data))
    return s


def read(record: dict, fmt: DataFormat, **data) -> Conversation:
    return to_conversation(RawRecord("x.jsonl:1", record), source(fmt, **data))


def call(id_, name, arguments):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


# An OpenAI function-calling conversation: two parallel calls (arguments as an object and as a JSON string), their
# results (one of them JSON, one given as ipython), the answer, then a follow-up answered without tools.
OPENAI = {
    "tools": json.dumps([WEATHER, CLOCK]),
    "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Two tools at once.",
            "tool_calls": [call("call00001", "weather", {"city": "Paris"}), call("call00002", "clock", "{}")],
        },
        {"role": "tool", "tool_call_id": "call00001", "name": "weather", "content": {"sky": "sunny", "c": 21}},
        {"role": "ipython", "content": "12:00"},
        {"role": "assistant", "content": "Sunny, 21 C, and it is noon."},
        {"role": "user", "content": "Thanks!", "train": True},
        {"role": "assistant", "content": "You're welcome.", "train": False},
    ],
}

EXPECTED_MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris, and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("call00001", "weather", {"city": "Paris"}), call("call00002", "clock", "{}")],
        "reasoning_content": "Two tools at once.",
    },
    {"role": "tool", "content": '{"sky": "sunny", "c": 21}', "tool_call_id": "call00001", "name": "weather"},
    {"role": "tool", "content": "12:00", "tool_call_id": "call00002", "name": "clock"},
    {"role": "assistant", "content": "Sunny, 21 C, and it is noon."},
    {"role": "user", "content": "Thanks!", "train": True},
    {"role": "assistant", "content": "You're welcome.", "train": False},
]


def test_openai_tool_conversation_is_read_as_given():
    conv = read(OPENAI, DataFormat.messages)
    assert conv.messages == EXPECTED_MESSAGES
    assert conv.tools == [WEATHER, CLOCK]  # the JSON string parsed once
    assert conv.template_kwargs == {} and not conv.is_plain
    # Arguments keep the form they were given in: the renderer decides what the template needs.
    assert [c["function"]["arguments"] for c in conv.messages[2]["tool_calls"]] == [{"city": "Paris"}, "{}"]


def test_sharegpt_with_function_call_and_observation_equals_the_openai_conversation():
    sharegpt = {
        "system": "You are helpful.",
        "tools": [WEATHER, CLOCK],
        "conversations": [
            {"from": "human", "value": "Weather in Paris, and the time?"},
            {
                "from": "function_call",
                "value": json.dumps([{"name": "weather", "arguments": {"city": "Paris"}}, {"name": "clock", "arguments": "{}"}]),
                "thinking": "Two tools at once.",
            },
            {"from": "observation", "value": json.dumps([{"sky": "sunny", "c": 21}, "12:00"])},
            {"from": "gpt", "value": "Sunny, 21 C, and it is noon."},
            {"from": "human", "value": "Thanks!", "train": True},
            {"from": "gpt", "value": "You're welcome.", "train": False},
        ],
    }
    conv = read(sharegpt, DataFormat.sharegpt)
    expected = read(OPENAI, DataFormat.messages)
    # ShareGPT has no reasoning on a function_call turn (it is JSON only), so compare without it.
    del expected.messages[2]["reasoning_content"]
    assert conv == expected


def test_sharegpt_assistant_text_then_call_is_one_turn_and_single_results_stay_whole():
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "List files"},
            {"from": "gpt", "value": "Let me look."},
            {"from": "function_call", "value": '{"name": "ls", "arguments": "{\\"path\\": \\"/\\"}"}'},
            {"from": "observation", "value": '["a.txt", "b.txt"]'},  # one call: a JSON list is its one result
            {"from": "gpt", "value": "a.txt and b.txt"},
        ]
    }
    openai = {
        "messages": [
            {"role": "user", "content": "List files"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [call("call00001", "ls", '{"path": "/"}')]},
            {"role": "tool", "tool_call_id": "call00001", "name": "ls", "content": '["a.txt", "b.txt"]'},
            {"role": "assistant", "content": "a.txt and b.txt"},
        ]
    }
    assert read(sharegpt, DataFormat.sharegpt) == read(openai, DataFormat.messages)


def test_sharegpt_multi_step_calls_number_their_ids_in_order():
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": '{"name": "a", "arguments": {}}'},
            {"from": "observation", "value": "1"},
            {"from": "function_call", "value": '{"name": "b", "arguments": {"x": 1}}'},
            {"from": "observation", "value": "2"},
            {"from": "gpt", "value": "done"},
        ]
    }
    conv = read(sharegpt, DataFormat.sharegpt)
    assert [(m["role"], m.get("tool_call_id")) for m in conv.messages] == [
        ("user", None),
        ("assistant", None),
        ("tool", "call00001"),
        ("assistant", None),
        ("tool", "call00002"),
        ("assistant", None),
    ]
    assert conv.messages[3]["tool_calls"] == [call("call00002", "b", {"x": 1})]


def test_a_mapped_source_equals_the_messages_record():
    mapped = {"dialog": [{"speaker": "client", "text": "hi"}, {"speaker": "agent", "text": "hello"}]}
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert read(mapped, DataFormat.messages, **MAPPING) == read(plain, DataFormat.messages)
    # The brief's ShareGPT-as-messages mapping reads the same as the sharegpt format.
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    as_messages = dict(messages_field="conversations", role_key="from", content_key="value", roles={"human": "user", "gpt": "assistant"})
    assert read(sharegpt, DataFormat.messages, **as_messages) == read(sharegpt, DataFormat.sharegpt) == read(plain, DataFormat.messages)


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"chat": [{"role": "user", "content": "hi"}]}, "missing field 'dialog'"),
        ({"dialog": [{"text": "hi"}, {"speaker": "agent", "text": "x"}]}, "missing field 'speaker'"),
        ({"dialog": [{"speaker": "client", "content": "hi"}, {"speaker": "agent", "text": "x"}]}, "missing field 'text'"),
        ({"dialog": [{"speaker": "robot", "text": "hi"}, {"speaker": "agent", "text": "x"}]}, "unknown role"),
    ],
)
def test_a_mapped_field_absent_from_a_record_is_named(record, reason):
    with pytest.raises(InvalidRecord) as err:
        read(record, DataFormat.messages, **MAPPING)
    assert err.value.reason == reason and "x.jsonl:1" in str(err.value)


def test_prompt_completion_strings_are_plain_segments():
    conv = read({"prompt": "The sky is", "completion": " blue."}, DataFormat.prompt_completion)
    assert conv == Conversation(segments=[("The sky is", False), (" blue.", True)]) and conv.is_plain


def test_prompt_completion_messages_train_only_the_completion():
    record = {
        "prompt": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        "completion": [{"role": "assistant", "content": "d"}],
        "chat_template_kwargs": {"enable_thinking": False},
    }
    equivalent = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "train": False},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
        "chat_template_kwargs": {"enable_thinking": False},
    }
    assert read(record, DataFormat.prompt_completion) == read(equivalent, DataFormat.messages)
    with pytest.raises(InvalidRecord, match="the completion holds no assistant message"):
        read({"prompt": [user("a"), assistant("b")], "completion": []}, DataFormat.prompt_completion)
    with pytest.raises(InvalidRecord) as err:
        read({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, DataFormat.prompt_completion)
    assert err.value.reason == "prompt and completion of different shapes"


def test_text_is_one_trained_segment():
    assert read({"text": "Once upon a time."}, DataFormat.text) == Conversation(segments=[("Once upon a time.", True)])
    with pytest.raises(InvalidRecord) as err:
        read({"text": "  "}, DataFormat.text)
    assert err.value.reason == "empty text"


def test_alpaca_is_read_as_before():
    conv = read({"instruction": "Add", "input": "1 2", "output": "3", "system": "Be exact."}, DataFormat.alpaca)
    assert conv == Conversation(
        [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    )


def test_record_template_arguments_win_over_the_source_default():
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    defaults = {"enable_thinking": False, "style": "short"}
    assert read(record, DataFormat.messages, chat_template_kwargs=defaults).template_kwargs == defaults
    own = read({**record, "chat_template_kwargs": {"enable_thinking": True}}, DataFormat.messages, chat_template_kwargs=defaults)
    assert own.template_kwargs == {"enable_thinking": True, "style": "short"}
    with pytest.raises(InvalidRecord, match="set by dtrain itself"):
        read({**record, "chat_template_kwargs": {"tools": []}}, DataFormat.messages)


def user(text, **extra):
    return {"role": "user", "content": text, **extra}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def calls(*tool_calls):
    return {"role": "assistant", "tool_calls": list(tool_calls)}


def result(text, **extra):
    return {"role": "tool", "content": text, **extra}


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([user("a"), assistant(None, tool_calls={"name": "f"})], "invalid tool_calls"),
        ([user("a"), calls({"name": "f", "arguments": {}})], "invalid tool_calls"),
        ([user("a"), calls(call("c", "f", "{oops"))], "tool call arguments not JSON"),
        ([user("a"), result("1"), assistant("b")], "tool result without a tool call"),
        ([user("a"), calls(call("c1", "f", {})), result("1", tool_call_id="c9")], "tool result without a tool call"),
        ([user("a"), assistant("b", train="yes")], "train flag not a boolean"),
        ([user("a"), assistant("")], "empty assistant content"),
        ([user("a"), assistant(None, tool_calls=[])], "empty assistant content"),
        ([user("a"), assistant("b", train=False)], "no trained turn"),
        ([user("a"), user("b"), assistant("c")], "non-alternating roles"),
        ([user("a"), calls(call("c1", "f", {})), result("1"), user("b")], "non-alternating roles"),
        ([user("a", reasoning_content="x"), assistant("b")], "reasoning outside an assistant turn"),
    ],
)
def test_each_broken_tool_conversation_has_its_reason(messages, reason):
    with pytest.raises(InvalidRecord) as err:
        read({"messages": messages}, DataFormat.messages)
    assert err.value.reason == reason and str(err.value).startswith("x.jsonl:1: ")


def test_a_call_only_conversation_and_a_trained_user_turn_are_accepted():
    only_call = [user("a"), calls(call("c1", "f", {"x": 1}))]
    assert read({"messages": only_call}, DataFormat.messages).messages[1] == assistant(None, tool_calls=[call("c1", "f", {"x": 1})])
    trained_user = [user("a", train=True), assistant("b", train=False)]
    assert read({"messages": trained_user}, DataFormat.messages).messages == trained_user


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"messages": []}, DataFormat.messages),
        ({"conversations": []}, DataFormat.sharegpt),
        ({"prompt": "a", "completion": "b"}, DataFormat.prompt_completion),
        ({"text": "a", "meta": {"url": "x"}}, DataFormat.text),
        ({"instruction": "a", "input": "", "output": "b"}, DataFormat.alpaca),
        ({"prompt": "ultrachat keeps the prompt beside its messages", "messages": []}, DataFormat.messages),
    ],
)
def test_format_is_detected_from_the_first_record_of_a_known_shape(tmp_path, record, fmt):
    path = tmp_path / "d.jsonl"
    path.write_text('{"broken\n' + json.dumps({"id": 1}) + "\n" + json.dumps(record) + "\n")
    (s,) = data_sources(DataConfig(path=str(path)))
    assert s.format == DataFormat.auto
    resolved = resolve_format(s)
    assert (resolved.format, resolved.format_detected) == (fmt, True)


def test_an_ambiguous_or_unknown_shape_is_an_error_naming_the_fields_and_formats(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "messages": []}) + "\n")
    with pytest.raises(DataError, match=r"fields \['messages', 'text'\], which fit \['messages', 'text'\]; set the source's format"):
        detect_format(data_sources(DataConfig(path=str(path)))[0])
    path.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(DataError) as err:
        detect_format(data_sources(DataConfig(path=str(path)))[0])
    assert "their fields: ['answer', 'question']" in str(err.value)
    assert "sharegpt: conversations" in str(err.value) and "prompt_completion: prompt + completion" in str(err.value)
    # A messages_field names the conversation field: such records read as messages.
    assert detect_format(data_sources(DataConfig(path=str(path), messages_field="question"))[0]) == DataFormat.messages


def test_mapping_and_template_arguments_are_checked_per_source():
    with pytest.raises(ConfigError, match=r"data.sources\[0\] \(a.jsonl\): roles maps to \{'bot': 'robot'\}"):
        data_sources(DataConfig(sources=[SourceConfig(path="a.jsonl", roles={"bot": "robot"})]))
    with pytest.raises(ConfigError, match=r"data: chat_template_kwargs sets \['add_generation_prompt'\]"):
        data_sources(DataConfig(path="a.jsonl", chat_template_kwargs={"add_generation_prompt": True}))
    a, b = data_sources(
        DataConfig(
            sources=[SourceConfig(path="a.jsonl"), SourceConfig(path="b.jsonl", role_key="from", chat_template_kwargs={"x": 1})],
            role_key="speaker",
            roles={"bot": "assistant"},
            chat_template_kwargs={"x": 0},
        )
    )
    assert (a.mapping.role_key, b.mapping.role_key) == ("speaker", "from")
    assert a.mapping.roles == b.mapping.roles == (("bot", "assistant"),)
    assert (a.template_kwargs, b.template_kwargs) == ({"x": 0}, {"x": 1})


def test_a_long_text_document_is_cut_into_windows_that_train_each_token_once():
    from collections import Counter

    from dtrain.data.chat import TokenizedExample
    from dtrain.data.dataset import DOCUMENT_WINDOWS, document_windows

    ids = list(range(100, 110))
    long_doc = TokenizedExample("d.jsonl:3", ids, list(ids))
    counted = Counter()
    windows = document_windows(Conversation(segments=[("ten tokens", True)]), [long_doc], 4, counted)
    assert [w.input_ids for w in windows] == [ids[0:4], ids[3:7], ids[6:10]]
    assert [w.source for w in windows] == ["d.jsonl:3#window1", "d.jsonl:3#window2", "d.jsonl:3#window3"]
    assert [w.truncated for w in windows] == [True, True, False]
    # Position 0 of a window has no predictor: the targets of all windows are the document's tokens after its first, once.
    assert [t for w in windows for t in w.labels[1:]] == ids[1:]
    assert counted == Counter({DOCUMENT_WINDOWS: 1})
    # A prompt/completion string pair (its prompt untrained) and a chat are left to truncation; a short document is kept whole.
    pair = Conversation(segments=[("a", False), ("b", True)])
    assert document_windows(pair, [long_doc], 4, counted) == [long_doc]
    assert document_windows(Conversation([user("a"), assistant("b")]), [long_doc], 4, counted) == [long_doc]
    assert document_windows(Conversation(segments=[("x", True)]), [long_doc], 10, counted) == [long_doc]
    assert counted == Counter({DOCUMENT_WINDOWS: 1})


def test_an_unreadable_shape_fails_the_start_up_checks_naming_the_source(tmp_path):
    from dtrain.config.checks import check_data_sources

    good, odd = tmp_path / "good.jsonl", tmp_path / "odd.jsonl"
    good.write_text(json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}) + "\n")
    odd.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    check_data_sources(DataConfig(path=str(good)))
    with pytest.raises(DataError, match=r"data.sources\[1\] \(odd\): source 'odd' .*found no record of a known format"):
        check_data_sources(DataConfig(sources=[SourceConfig(path=str(good)), SourceConfig(path=str(odd))]))
    check_data_sources(DataConfig(sources=[SourceConfig(path=str(good)), SourceConfig(path=str(odd), format=DataFormat.text)]))


def test_openai_legacy_function_calls_and_developer_role_read_as_tool_calls():
    legacy = {
        "messages": [
            {"role": "developer", "content": "Be exact."},
            user("a"),
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"x": 1}'}},
            {"role": "function", "name": "f", "content": "2"},
            assistant("b"),
        ]
    }
    current = {
        "messages": [
            {"role": "system", "content": "Be exact."},
            user("a"),
            assistant(None, tool_calls=[call("call00001", "f", '{"x": 1}')]),
            result("2", tool_call_id="call00001", name="f"),
            assistant("b"),
        ]
    }
    assert read(legacy, DataFormat.messages) == read(current, DataFormat.messages)


def test_a_mixture_of_shapes_prepares_the_same_tokens_as_its_messages_source(tmp_path, tiny_tokenizer):
    from dtrain.data import ChatRenderer, prepare_data

    chats = [(f"upper: w{i}", f"W{i}") for i in range(6)]
    shapes = {
        "chats": [{"messages": [user(q), assistant(a)]} for q, a in chats],
        "gpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in chats],
        "pairs": [{"prompt": [user(q)], "completion": [assistant(a)]} for q, a in chats],
        "dialogs": [{"dialog": [{"speaker": "client", "text": q}, {"speaker": "agent", "text": a}]} for q, a in chats],
        "tasks": [{"instruction": q, "output": a} for q, a in chats],
    }
    sources = []
    for name, rows in shapes.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        mapping = {k: v for k, v in MAPPING.items() if k != "roles"} if name == "dialogs" else {}
        sources.append(SourceConfig(path=str(tmp_path / f"{name}.jsonl"), roles=MAPPING["roles"] if mapping else None, **mapping))
    data = prepare_data(DataConfig(sources=sources, eval_fraction=0, num_proc=1), ChatRenderer(tiny_tokenizer, "assistant"), 0, 0)
    assert data.formats == {
        "chats": "messages (detected)",
        "gpt": "sharegpt (detected)",
        "pairs": "prompt_completion (detected)",
        "dialogs": "messages (detected)",
        "tasks": "alpaca (detected)",
    }
    by_source = [[(e.input_ids, e.labels) for e, s in zip(data.train, data.train.source_index) if s == k] for k in range(len(shapes))]
    assert len(by_source[0]) == len(chats) and all(examples == by_source[0] for examples in by_source)


def test_the_start_up_log_names_each_source_format(tmp_path, tiny_tokenizer, caplog, monkeypatch):
    import logging

    from dtrain.data import ChatRenderer
    from dtrain.data.cache import load_or_prepare

    turns = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    (tmp_path / "gpt.jsonl").write_text(json.dumps({"conversations": turns}) + "\n")
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    sources = [SourceConfig(path=str(tmp_path / "gpt.jsonl")), SourceConfig(path=str(tmp_path / "tasks.jsonl"), format=DataFormat.alpaca)]
    cfg = DataConfig(sources=sources, eval_fraction=0, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(logging.getLogger("dtrain"), "propagate", True)  # setup_logging (other tests) turns it off
    with caplog.at_level(logging.INFO, logger="dtrain"):
        for _ in range(2):  # prepared, then opened from the store: logged both times
            load_or_prepare(cfg, ChatRenderer(tiny_tokenizer, "assistant"), 0, 0, is_local_main=True, barrier=lambda: None)
    assert [r.getMessage() for r in caplog.records if "record formats" in r.getMessage()] == [
        "record formats: gpt: sharegpt (detected), tasks: alpaca"
    ] * 2


def test_parquet_messages_with_every_key_null_where_unset_read_like_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dtrain.data.sources import load_records

    messages = [
        user("weather?"),
        {"role": "assistant", "tool_calls": [call("c1", "weather", '{"city": "Paris"}')], "reasoning_content": "look it up"},
        result("sunny", tool_call_id="c1", name="weather"),
        assistant("Sunny.", train=True),
    ]
    pq.write_table(pa.Table.from_pylist([{"messages": messages}]), tmp_path / "d.parquet")
    (record,) = load_records(str(tmp_path / "d.parquet"))
    assert record.data["messages"][0]["train"] is None and record.data["messages"][0]["tool_calls"] is None  # nulls where unset
    assert to_conversation(record, source(DataFormat.messages)) == read({"messages": messages}, DataFormat.messages)


def test_the_eval_file_format_is_detected_on_its_own(tmp_path, tiny_tokenizer):
    from dtrain.data import ChatRenderer, prepare_data

    turns = [{"from": "human", "value": "upper: ab"}, {"from": "gpt", "value": "AB"}]
    (tmp_path / "gpt.jsonl").write_text(json.dumps({"conversations": turns}) + "\n")
    (tmp_path / "held.jsonl").write_text(json.dumps({"messages": [user("upper: ab"), assistant("AB")]}) + "\n")
    cfg = DataConfig(path=str(tmp_path / "gpt.jsonl"), eval_path=str(tmp_path / "held.jsonl"), num_proc=1)
    data = prepare_data(cfg, ChatRenderer(tiny_tokenizer, "assistant"), 0, 1)
    assert data.formats == {"gpt": "sharegpt (detected)", "eval_path": "messages (detected)"}
    assert [(e.input_ids, e.labels) for e in data.eval] == [(e.input_ids, e.labels) for e in data.train]
    assert data.prompts[0].messages == [user("upper: ab")] and data.prompts[0].reference == "AB"
