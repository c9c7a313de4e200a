"""Reading a record's list of turns into checked, OpenAI-shaped messages (``dtrain/data/conversation.py``).

The ``messages``, ``sharegpt`` and ``prompt_completion`` adapters (``dtrain/data/formats.py``) all read their turns
here, so a ShareGPT conversation and its OpenAI equivalent become the same messages. What a turn's keys are called
(``role``/``content`` or ``from``/``value``, or a source's own mapping) and how its role names translate are the
adapter's ``TurnKeys``; everything after that is shared:

- roles system/user/assistant/tool (``ipython`` and OpenAI's older ``function`` are read as tool, ``developer`` as
  system; an assistant ``function_call`` as a one-call ``tool_calls``); ShareGPT's ``function_call`` turn (a JSON call
  or list of calls) becomes an assistant tool-call turn, joined to the assistant text right before it if any, with
  ids ``call00001``, ``call00002``, ... in conversation order where the data gives none (nine characters: what
  Mistral's templates require); an ``observation`` turn becomes a tool result, or several when it is a JSON list of
  as many results as the calls it answers;
- a tool result without ``tool_call_id``/``name`` gets those of the call at its position (the k-th result after a
  call turn answers its k-th call); a non-string result is written as JSON text;
- ``reasoning_content`` (or ``thinking``) on an assistant turn is kept as ``reasoning_content``; a per-message
  ``train`` flag is kept; other keys are not passed on.

Turn order: an optional system message first, then user and assistant turns in alternation, where an assistant
turn with tool calls may be followed by its tool results (one or more in a row) and then the next assistant turn.
Two user turns or two assistant turns in a row, a system message later in the conversation, a user turn right after
tool results and a tool result that answers no call stay refused: templates render them inconsistently (Llama-2 and
Mistral raise, others silently merge or drop), and no chat model is served such a conversation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from dtrain.data.conversation import Message
from dtrain.data.sources import InvalidRecord

READ_ROLES = ("system", "user", "assistant", "tool", "function_call", "observation")
"""What a turn's role may be after its source's role map (the last two: ShareGPT's tool turns)."""

_ABSENT = object()


@dataclass(frozen=True)
class TurnKeys:
    """Where a record keeps its turns and what they are called."""

    field: str
    role: str
    content: str
    roles: dict[str, str] = field(default_factory=dict)
    """The data's role names to ``READ_ROLES`` (names not listed are read as they are)."""


OPENAI_KEYS = TurnKeys("messages", "role", "content", {"ipython": "tool", "function": "tool", "developer": "system"})
SHAREGPT_KEYS = TurnKeys(
    "conversations",
    "from",
    "value",
    {"human": "user", "gpt": "assistant", "ipython": "observation", "tool": "observation"},
)


def read_messages(turns: Any, keys: TurnKeys, source: str, completion_from: Optional[int] = None) -> list[Message]:
    """The checked messages of ``turns`` (a record's list of turn dicts).

    Args:
        turns: The record's turns.
        keys: Their field, key and role names.
        source: ``file:line`` of the record, for errors.
        completion_from: Prompt/completion records: the index of the first completion turn; assistant turns before it
            are context (``train: false`` unless they carry their own flag).

    Raises:
        InvalidRecord: naming ``source`` and what is wrong, with a short reason (module docstring).
    """
    if not isinstance(turns, list) or not turns:
        raise InvalidRecord(source, f"missing field {keys.field!r}", f"{keys.field!r} must be a non-empty list")
    reader = _Reader(keys, source)
    for i, turn in enumerate(turns):
        reader.read(i, turn, context=completion_from is not None and i < completion_from)
    messages = reader.messages
    check_order(messages, source)
    completion = messages[reader.first_of.get(completion_from, len(messages)) :] if completion_from is not None else messages
    if not any(m["role"] == "assistant" for m in completion):
        raise InvalidRecord(source, "no assistant turn", "the completion holds no assistant message")
    if not any(m.get("train", m["role"] == "assistant") for m in messages):
        raise InvalidRecord(source, "no trained turn", "every assistant turn has train: false and no message has train: true")
    return messages


class _Reader:
    """Turns to messages, one at a time (a ShareGPT turn may join the previous message or become several)."""

    def __init__(self, keys: TurnKeys, source: str):
        self.keys, self.source = keys, source
        self.messages: list[Message] = []
        self.first_of: dict[int, int] = {}  # turn index -> index of its first message
        self.calls: list[dict] = []  # the tool calls of the last assistant call turn
        self.ids_given = False  # whether the data named those calls' ids
        self.results = 0  # tool results read since that turn
        self.generated = 0  # call ids made so far

    def fail(self, reason: str, detail: str) -> InvalidRecord:
        return InvalidRecord(self.source, reason, detail)

    def read(self, i: int, turn: Any, context: bool) -> None:
        keys = self.keys
        self.first_of[i] = len(self.messages)
        if not isinstance(turn, dict):
            raise self.fail(f"missing field {keys.role!r}", f"message {i} is a {type(turn).__name__}, not an object")
        if keys.role not in turn:
            raise self.fail(f"missing field {keys.role!r}", f"message {i}")
        named = turn[keys.role]
        role = keys.roles.get(named, named) if isinstance(named, str) else named
        if role not in READ_ROLES:
            accepted = sorted({"system", "user", "assistant", "tool", *keys.roles})
            raise self.fail("unknown role", f"message {i} has {keys.role} {named!r}; expected one of {accepted} (or map it: data.roles)")
        content = turn.get(keys.content, _ABSENT)
        train = turn.get("train")
        train = _ABSENT if train is None else train  # Parquet gives every message of a list every key, null where unset
        if train is not _ABSENT and not isinstance(train, bool):
            raise self.fail("train flag not a boolean", f"message {i} has train={train!r}; use true or false")
        if role in ("system", "user"):
            message = {"role": role, "content": self._text(i, content)}
            self._reasoning(i, turn, role)
        elif role == "assistant":
            message = self._assistant(i, turn, content)
        elif role == "function_call":
            message = self._function_call(i, content)
            if message is None:  # joined to the assistant text right before it
                self._flag(self.messages[-1], train)
                return
        else:
            for message in self._results(i, turn, content, role):
                self._flag(message, train)
                self.messages.append(message)
            return
        if message.get("tool_calls") is None:
            self.calls, self.results = [], 0
        if context and role == "assistant" and train is _ABSENT:
            train = False
        self._flag(message, train)
        self.messages.append(message)

    @staticmethod
    def _flag(message: Message, train: Any) -> None:
        if train is not _ABSENT:
            message["train"] = train

    def _text(self, i: int, content: Any) -> str:
        if content is _ABSENT:
            raise self.fail(f"missing field {self.keys.content!r}", f"message {i}")
        if not isinstance(content, str):
            raise self.fail("non-string content", f"message {i} content is {type(content).__name__}")
        return content

    def _reasoning(self, i: int, turn: dict, role: str) -> Optional[str]:
        reasoning = turn.get("reasoning_content")
        if reasoning is None:
            reasoning = turn.get("thinking")
        if reasoning is None:
            return None
        if role != "assistant":
            raise self.fail("reasoning outside an assistant turn", f"message {i} ({role}) carries reasoning_content/thinking")
        if not isinstance(reasoning, str):
            raise self.fail("non-string content", f"message {i} reasoning is {type(reasoning).__name__}")
        return reasoning

    def _assistant(self, i: int, turn: dict, content: Any) -> Message:
        calls = turn.get("tool_calls")
        if calls is None and turn.get("function_call") is not None:  # OpenAI's older single call
            calls = [{"type": "function", "function": turn["function_call"]}]
        if calls is not None and calls != []:
            calls = self._tool_calls(i, calls)
        else:
            calls = None
        if content is _ABSENT and calls is None:
            raise self.fail(f"missing field {self.keys.content!r}", f"message {i}")
        content = None if content is _ABSENT else content
        if content is not None and not isinstance(content, str):
            raise self.fail("non-string content", f"message {i} content is {type(content).__name__}")
        if calls is None and not (content or "").strip():
            raise self.fail("empty assistant content", f"message {i} has neither text nor tool calls")
        message: Message = {"role": "assistant", "content": content}
        if calls is not None:
            message["tool_calls"] = calls
            self.calls, self.results = calls, 0
        reasoning = self._reasoning(i, turn, "assistant")
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return message

    def _tool_calls(self, i: int, calls: Any) -> list[dict]:
        shape = 'a list of {"id", "type": "function", "function": {"name", "arguments"}}'
        if not isinstance(calls, list):
            raise self.fail("invalid tool_calls", f"message {i}: tool_calls is a {type(calls).__name__}; expected {shape}")
        out = []
        self.ids_given = True
        for k, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if (
                not isinstance(function, dict)
                or not isinstance(function.get("name"), str)
                or not function["name"]
                or "arguments" not in function
                or call.get("type", "function") != "function"
            ):
                raise self.fail("invalid tool_calls", f"message {i}, call {k}: {json.dumps(call)[:200]}; expected {shape}")
            arguments = function["arguments"]
            if isinstance(arguments, str):
                try:
                    json.loads(arguments)
                except json.JSONDecodeError as e:
                    raise self.fail("tool call arguments not JSON", f"message {i}, call {k}: {e.msg} in {arguments[:200]!r}") from None
            elif not isinstance(arguments, dict):
                raise self.fail("invalid tool_calls", f"message {i}, call {k}: arguments must be an object or a JSON string")
            call_id = call.get("id")
            if call_id is None:
                self.generated += 1
                call_id, self.ids_given = f"call{self.generated:05d}", False
            elif not isinstance(call_id, str):
                raise self.fail("invalid tool_calls", f"message {i}, call {k}: id {call_id!r} is not a string")
            out.append({"id": call_id, "type": "function", "function": {"name": function["name"], "arguments": arguments}})
        return out

    def _function_call(self, i: int, content: Any) -> Optional[Message]:
        """A ShareGPT ``function_call`` turn: a new assistant turn, or None when it joins the assistant text before it."""
        if content is _ABSENT:
            raise self.fail(f"missing field {self.keys.content!r}", f"message {i}")
        value = content
        if isinstance(content, str):
            try:
                value = json.loads(content)
            except json.JSONDecodeError as e:
                raise self.fail("function_call not JSON", f"message {i}: {e.msg} in {content[:200]!r}") from None
        listed = value if isinstance(value, list) else [value]
        if not listed or not all(isinstance(c, dict) and "name" in c for c in listed):
            raise self.fail("invalid tool_calls", f'message {i}: a function_call is a JSON {{"name", "arguments"}} or a list of them')
        calls = self._tool_calls(i, [{"type": "function", "function": c} for c in listed])
        self.ids_given = False
        last = self.messages[-1] if self.messages else None
        if last is not None and last["role"] == "assistant" and "tool_calls" not in last:
            last["tool_calls"] = calls
            self.calls, self.results = calls, 0
            return None
        self.calls, self.results = calls, 0
        return {"role": "assistant", "content": None, "tool_calls": calls}

    def _results(self, i: int, turn: dict, content: Any, role: str) -> list[Message]:
        """Tool result messages of one tool (or ShareGPT observation) turn."""
        last = self.messages[-1]["role"] if self.messages else None
        answers = last == "tool" or (last == "assistant" and self.messages[-1].get("tool_calls"))
        if not answers or not self.calls:
            raise self.fail("tool result without a tool call", f"message {i} follows {last or 'nothing'}, not an assistant tool call")
        if content is _ABSENT:
            raise self.fail(f"missing field {self.keys.content!r}", f"message {i}")
        contents = [content]
        if role == "observation" and self.results == 0 and len(self.calls) > 1 and isinstance(content, str):
            try:
                several = json.loads(content)
            except json.JSONDecodeError:
                several = None
            if isinstance(several, list) and len(several) == len(self.calls):
                contents = several
        out = []
        for one in contents:
            message: Message = {"role": "tool", "content": one if isinstance(one, str) else json.dumps(one, ensure_ascii=False)}
            call = self.calls[self.results] if self.results < len(self.calls) else None
            for key, filled in (("tool_call_id", call and call["id"]), ("name", call and call["function"]["name"])):
                given = turn.get(key) if role == "tool" else None
                if given is not None and not isinstance(given, str):
                    raise self.fail("invalid tool result", f"message {i}: {key} {given!r} is not a string")
                if given is not None or filled is not None:
                    message[key] = given if given is not None else filled
            called = {c["id"] for c in self.calls}
            if role == "tool" and self.ids_given and turn.get("tool_call_id") is not None and turn["tool_call_id"] not in called:
                detail = f"message {i}: tool_call_id {turn['tool_call_id']!r} answers none of {sorted(called)}"
                raise self.fail("tool result without a tool call", detail)
            self.results += 1
            out.append(message)
        return out


def check_order(messages: list[Message], source: str) -> None:
    """Refuse turn orders no template renders consistently (module docstring), and conversations without an answer.

    Raises:
        InvalidRecord: "non-alternating roles" or "no assistant turn".
    """
    roles = [m["role"] for m in messages]
    allowed_after = {
        None: ("system", "user"),
        "system": ("user",),
        "user": ("assistant",),
        "assistant": ("user", "tool"),
        "tool": ("tool", "assistant"),
    }
    previous = None
    for i, role in enumerate(roles):
        if role not in allowed_after[previous]:
            raise InvalidRecord(
                source,
                "non-alternating roles",
                f"got {roles}; expected an optional system message, then user/assistant turns in alternation (an assistant "
                "tool call may be followed by its tool results, then the assistant again): "
                f"message {i} ({role}) cannot follow {previous or 'the start'}",
            )
        previous = role
    if "assistant" not in roles:
        raise InvalidRecord(source, "no assistant turn", "nothing would be trained")
