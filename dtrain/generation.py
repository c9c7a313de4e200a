"""The generation check: greedy answers to held-out prompts and their exact-match accuracy.

A prompt whose reference turn is a tool call is scored on the call the model emits: the first JSON object in the
generated text with a ``name`` must name the reference's function, with the same arguments (parsed, so spacing and
key order do not matter).
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from dtrain.data.chat import ChatRenderer
from dtrain.data.dataset import GenerationPrompt


@torch.no_grad()
def generate_answers(
    model,
    renderer: ChatRenderer,
    prompts: list[GenerationPrompt],
    *,
    device: torch.device,
    max_new_tokens: int,
    synced_gpus: bool,
    batch_size: int = 16,
) -> list[dict]:
    """Greedy-decode an answer for each prompt; stop at the end-of-turn token.

    Every rank must call this with the same prompts: under ZeRO-3 each forward gathers parameters collectively,
    and ``synced_gpus`` keeps ranks stepping together until all of them have finished.

    Returns:
        One dict per prompt: ``source``, ``prompt`` (rendered text), ``generated``, ``reference``, ``exact_match``.
    """
    tokenizer = renderer.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else renderer.end_of_turn_id
    was_training = model.training
    model.eval()
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = [renderer.render_prompt(p.conversation) for p in chunk]
        width = max(len(ids) for ids in encoded)
        # Left padding, so every row's answer starts right after its own prompt.
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=renderer.end_of_turn_id,
            pad_token_id=pad_id,
            use_cache=True,
            synced_gpus=synced_gpus,
        )
        for row, prompt in enumerate(chunk):
            new_tokens = output[row, width:].tolist()
            if renderer.end_of_turn_id in new_tokens:
                new_tokens = new_tokens[: new_tokens.index(renderer.end_of_turn_id)]
            text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
            result = {
                "source": prompt.source,
                "prompt": tokenizer.decode(encoded[row]),
                "generated": text,
                "reference": prompt.reference,
                "exact_match": text == prompt.reference.strip(),
            }
            if prompt.reference_tool_calls:
                expected = [_call(c.get("function", c)) for c in prompt.reference_tool_calls]
                result["reference"] = json.dumps(expected[0] if len(expected) == 1 else expected)
                result["exact_match"] = emitted_calls(text) == expected
            results.append(result)
    model.train(was_training)
    return results


def shard_prompts(prompts: list, rank: int, world_size: int) -> tuple[list, int]:
    """This rank's share of the prompts (every ``world_size``-th, from ``rank``), padded to the same count on every rank.

    Each rank then decodes as many batches as every other: under ZeRO-3 every forward gathers parameters
    collectively, so a rank with a batch fewer would leave its peers waiting in a gather. The padding repeats the first
    prompt and its answers are dropped.

    Returns:
        The prompts to decode here, and how many of them (from the front) are this rank's own.
    """
    mine = prompts[rank::world_size]
    per_rank = -(-len(prompts) // world_size)
    return mine + prompts[:1] * (per_rank - len(mine)), len(mine)


def merge_shards(per_rank: list[list], count: int) -> list:
    """Undo :func:`shard_prompts`: the ranks' answers (each without its padding) back in the prompts' order."""
    world_size = len(per_rank)
    return [per_rank[i % world_size][i // world_size] for i in range(count)]


def exact_match_accuracy(results: list[dict]) -> float:
    return sum(r["exact_match"] for r in results) / max(len(results), 1)


def format_samples(results: list[dict], limit: int = 5) -> str:
    """A few generated answers next to their references, for the end-of-run printout."""
    lines = []
    for r in results[:limit]:
        mark = "ok " if r["exact_match"] else "BAD"
        question = r["prompt"].replace("\n", " ")[-60:]
        lines.append(f"  [{mark}] ...{question!r} -> {r['generated']!r} (expected {r['reference']!r})")
    return "\n".join(lines)


def _call(function: dict) -> dict:
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {"name": function.get("name"), "arguments": arguments}


def emitted_calls(text: str) -> Optional[list[dict]]:
    """The tool calls in generated text: each JSON object with a ``name`` (``arguments`` or Llama's ``parameters``),
    as ``{"name", "arguments"}``; None if it holds none."""
    decoder, calls, at = json.JSONDecoder(), [], text.find("{")
    while at >= 0:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            at = text.find("{", at + 1)
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            calls.append(_call(value))
        at = text.find("{", end)
    return calls or None
