"""Data: sources and mixtures, formats, chat rendering with structure-derived masks, the token store, batching."""

from dtrain.data.audit import audit_masks
from dtrain.data.batching import StepSampler, collate
from dtrain.data.cache import load_or_prepare
from dtrain.data.chat import IGNORE_INDEX, ChatRenderer, TokenizedExample, resolve_chat_template
from dtrain.data.dataset import GenerationPrompt, PreparedData, open_store, prepare_data
from dtrain.data.mixture import data_sources, mixture_weights
from dtrain.data.sources import load_records
from dtrain.data.store import TokenStore
from dtrain.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "ChatRenderer",
    "DataError",
    "GenerationPrompt",
    "PreparedData",
    "StepSampler",
    "TokenStore",
    "TokenizedExample",
    "audit_masks",
    "collate",
    "data_sources",
    "load_or_prepare",
    "load_records",
    "mixture_weights",
    "open_store",
    "prepare_data",
    "resolve_chat_template",
]
