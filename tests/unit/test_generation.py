"""The generation check: tool-call turns scored on the call the model emits (parsed JSON, right name and arguments), and
the prompts shared out among the ranks."""

import copy
import json
from pathlib import Path

import pytest
import torch

from dtrain.config.schema import TrainOn
from dtrain.data import ChatRenderer, GenerationPrompt, resolve_chat_template
from dtrain.generation import emitted_calls, generate_answers, merge_shards, shard_prompts

CALL = {"id": "call00001", "type": "function", "function": {"name": "weather", "arguments": json.dumps({"city": "oslo"})}}


def test_emitted_calls_are_parsed_whatever_the_spacing_and_tags():
    expected = [{"name": "weather", "arguments": {"city": "oslo"}}]
    assert emitted_calls('<tool_call>{"name": "weather", "arguments": {"city": "oslo"}}</tool_call>') == expected
    assert emitted_calls('<tool_call>{"arguments":{"city":"oslo"},"name":"weather"}') == expected
    assert emitted_calls('{"name": "weather", "parameters": {"city": "oslo"}}') == expected  # Llama-3.1's key
    assert emitted_calls('{"name": "weather", "arguments": "{\\"city\\": \\"oslo\\"}"}') == expected
    assert emitted_calls('{"name": "weather", "arguments": {"city": "oslo"') is None  # cut off: no call
    assert emitted_calls("it is 12 degrees") is None


class Scripted(torch.nn.Module):
    """A "model" whose generate() appends fixed tokens to each prompt."""

    def __init__(self, answer: list[int]):
        super().__init__()
        self.answer = answer

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([self.answer] * len(input_ids))], dim=1)


def test_a_call_prompt_is_scored_on_the_emitted_call(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    resolve_chat_template(tok, str(Path(__file__).resolve().parents[2] / "dtrain" / "assets" / "tiny" / "chat_template_tools.jinja"))
    renderer = ChatRenderer(tok, TrainOn.assistant)
    prompt = GenerationPrompt("t.jsonl:1", [{"role": "user", "content": "weather in oslo?"}], "", reference_tool_calls=[CALL])
    right_call, wrong_call = '{"name": "weather", "arguments": {"city": "oslo"}}', '{"name": "time", "arguments": {"city": "oslo"}}'
    for emitted, right in ((right_call, True), (wrong_call, False)):
        ids = tok(f"<tool_call>{emitted}</tool_call>", add_special_tokens=False)["input_ids"] + [renderer.end_of_turn_id]
        [result] = generate_answers(Scripted(ids), renderer, [prompt], device=torch.device("cpu"), max_new_tokens=64, synced_gpus=False)
        assert result["exact_match"] is right
        assert json.loads(result["reference"]) == {"name": "weather", "arguments": {"city": "oslo"}}


@pytest.mark.parametrize("count, world_size", [(64, 2), (5, 2), (2, 4), (1, 2), (7, 3), (3, 1)])
def test_each_rank_decodes_its_share_in_as_many_batches_and_the_answers_come_back_in_order(count, world_size):
    prompts = [f"prompt {i}" for i in range(count)]
    shards = [shard_prompts(prompts, rank, world_size) for rank in range(world_size)]
    assert len({len(decoded) for decoded, _ in shards}) == 1  # the same number of generate calls on every rank
    owned = [decoded[:own] for decoded, own in shards]
    assert sorted(p for share in owned for p in share) == sorted(prompts)  # each prompt decoded once for real
    answers = [[p.replace("prompt", "answer") for p in share] for share in owned]
    assert merge_shards(answers, count) == [f"answer {i}" for i in range(count)]
