"""The one conversation type inside dtrain: every record shape is converted into it where it is read.

Record shapes (OpenAI messages with tools, ShareGPT, prompt/completion, plain text, alpaca, mapped fields) are
adapters at the edge (``dtrain/data/formats.py``); rendering, masks, the mask audit, the preview and generation read
only a ``Conversation`` and never branch on the shape it came from.

A chat conversation is a list of OpenAI-shaped messages, exactly the dicts a Hugging Face chat template receives:

    {"role": "system" | "user" | "assistant" | "tool",
     "content": str | None,                       # None or "" allowed on an assistant turn with tool_calls
     "tool_calls": [{"id": str, "type": "function",
                     "function": {"name": str, "arguments": dict | str}}],   # assistant only
     "reasoning_content": str,                     # assistant only: what reasoning templates render in <think>
     "tool_call_id": str, "name": str,             # tool only
     "train": bool}                                # optional per-message override of data.train_on

plus the record-level ``tools`` (JSON schemas, passed to the template as ``tools=``) and per-record template
arguments (``chat_template_kwargs``, e.g. ``enable_thinking``). A plain conversation (``text`` records, and
prompt/completion records given as strings) is rendered without any chat template: its ``segments`` are
concatenated, each trained or not, and the tokenizer's EOS token closes it (trained).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

Message = dict[str, Any]
"""One OpenAI-shaped chat message (see the module docstring for its keys)."""

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    """One record, as every later stage reads it.

    Attributes:
        messages: The chat messages (empty for a plain conversation).
        tools: Record-level tool schemas handed to the chat template (None: the record has none).
        template_kwargs: Extra keyword arguments for ``apply_chat_template`` (``chat_template_kwargs``).
        segments: For a plain conversation: ``(text, trained)`` pieces rendered without a chat template, followed
            by the EOS token (trained). None for a chat conversation.
    """

    messages: list[Message] = field(default_factory=list)
    tools: Optional[list[dict]] = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    segments: Optional[list[tuple[str, bool]]] = None

    @property
    def is_plain(self) -> bool:
        """True for text and string prompt/completion records (no chat template)."""
        return self.segments is not None
