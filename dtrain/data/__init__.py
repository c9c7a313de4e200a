"""Data: sources, formats, chat rendering with structure-derived masks, batching."""

from dtrain.data.batching import StepSampler, collate
from dtrain.data.chat import IGNORE_INDEX, ChatRenderer, TokenizedExample, resolve_chat_template
from dtrain.data.dataset import GenerationPrompt, PreparedData, prepare_data
from dtrain.data.sources import load_records
from dtrain.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "ChatRenderer",
    "DataError",
    "GenerationPrompt",
    "PreparedData",
    "StepSampler",
    "TokenizedExample",
    "collate",
    "load_records",
    "prepare_data",
    "resolve_chat_template",
]
