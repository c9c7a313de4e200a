"""The start-up mask audit: re-check, on a sample of the training data, what the loss will be taken on."""

from __future__ import annotations

import random
from typing import Sequence

from dtrain.config.schema import TrainOn
from dtrain.data.chat import IGNORE_INDEX, ChatRenderer, TokenizedExample
from dtrain.data.preview import highlight
from dtrain.errors import DataError


def _trained_spans(example: TokenizedExample) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate([*example.labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def audit_example(example: TokenizedExample, renderer: ChatRenderer) -> str | None:
    """The first problem with ``example``'s labels, or None."""
    if example.num_trained == 0:
        return "no token is trained"
    if any(label not in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels)):
        return "a label differs from its input token"
    if renderer.train_on == TrainOn.all:
        return None
    spans = _trained_spans(example)
    eos = renderer.tokenizer.eos_token_id
    for k, (start, end) in enumerate(spans):
        cut_by_truncation = example.truncated and k == len(spans) - 1 and end == len(example.input_ids)
        # A plain-text record (no chat template) ends with the tokenizer's EOS token instead.
        plain_end = end == len(example.input_ids) and example.input_ids[end - 1] == eos
        if example.input_ids[end - 1] != renderer.end_of_turn_id and not cut_by_truncation and not plain_end:
            return "a trained assistant span does not end with its end-of-turn token (the model would not learn to stop)"
        if renderer.end_of_turn_id in example.input_ids[start : end - 1]:
            # Message text that spells the token must stay text: trained as the token, the model learns to stop mid-answer.
            return "the end-of-turn token is trained inside an assistant span, before the end of the turn"
    return None


def audit_masks(examples: Sequence[TokenizedExample], renderer: ChatRenderer, seed: int, sample: int = 1000) -> int:
    """Check up to ``sample`` examples; stop with the highlighted example on the first problem.

    Returns:
        How many examples were checked.

    Raises:
        DataError: naming the example and the problem, with its rendering (trained tokens in [[ ]]).
    """
    # Indices, not examples: a token store reads only the sampled examples.
    chosen = range(len(examples)) if len(examples) <= sample else random.Random(seed).sample(range(len(examples)), sample)
    for i in chosen:
        example = examples[i]
        problem = audit_example(example, renderer)
        if problem:
            raise DataError(f"{example.source}: mask audit failed: {problem}:\n{highlight(example, renderer.tokenizer, color=False)}")
    return len(chosen)
