"""Generate the bundled synthetic tool-use set and its ChatML tool template, deterministically.

    python scripts/make_tool_assets.py

Writes ``dtrain/assets/data/tools_train.jsonl`` and ``tools_eval.jsonl`` (OpenAI chat format: record-level
``tools``, an assistant turn with ``tool_calls`` and null content, a ``tool`` result, the answer) and
``dtrain/assets/tiny/chat_template_tools.jinja``. The task: "weather in <city>?" or "time in <city>?" (38 cities)
must be answered by calling the right tool with the city copied into its arguments, then by reading the value the
tool returns (random numbers and times, so the answer is read, never memorised). Half of the eval records stop
after the call, so the generation check of ``+exp=tiny_cpu_tools`` scores emitted calls (parsed JSON: name and
arguments) as well as final answers. Same seed -> same bytes.
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA, TINY = ROOT / "dtrain" / "assets" / "data", ROOT / "dtrain" / "assets" / "tiny"
SEED = 4321
N_TRAIN, N_EVAL = 3000, 128

# ChatML; the tools listed by name in a system turn, each call as Hermes-style JSON in <tool_call> tags (the
# template serialises the arguments itself), tool results in a "tool" turn.
TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\ntools:' }}{% for t in tools %}{{ ' ' + t.function.name }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if m.content %}{{ m.content + '\\n' }}{% endif %}"
    "{%- for c in m.tool_calls %}{{ '<tool_call>' + {'name': c.function.name, 'arguments': c.function.arguments} | tojson"
    " + '</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CITIES = [
    "amsterdam",
    "athens",
    "berlin",
    "bern",
    "bogota",
    "cairo",
    "dakar",
    "delhi",
    "dublin",
    "hanoi",
    "havana",
    "kabul",
    "kyiv",
    "lagos",
    "lima",
    "lisbon",
    "london",
    "madrid",
    "manila",
    "miami",
    "milan",
    "moscow",
    "nairobi",
    "oslo",
    "ottawa",
    "paris",
    "prague",
    "quito",
    "riga",
    "rome",
    "seoul",
    "sofia",
    "tokyo",
    "tunis",
    "vienna",
    "warsaw",
    "zagreb",
    "zurich",
]
TOOLS = [  # short schemas: every record carries them, and the template writes only the names
    {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    for name in ("weather", "time")
]


def record(rng: random.Random, stop_at_call: bool) -> dict:
    city = rng.choice(CITIES)
    tool = rng.choice(["weather", "time"])
    if tool == "weather":
        value = str(rng.randint(0, 39))
        result, answer = json.dumps({"temp": int(value)}), f"it is {value} degrees"
    else:
        value = f"{rng.randint(0, 23):02d}:{rng.choice([0, 15, 30, 45]):02d}"
        result, answer = json.dumps({"time": value}), f"it is {value}"
    call_id = f"call{rng.randint(0, 99999):05d}"
    arguments = {"city": city}
    messages = [
        {"role": "user", "content": f"{tool} in {city}?"},
        {
            "role": "assistant",
            "content": None,
            # OpenAI sends arguments as a JSON string: the renderer hands this template an object.
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": tool, "arguments": json.dumps(arguments)}}],
        },
    ]
    if not stop_at_call:
        messages += [{"role": "tool", "tool_call_id": call_id, "content": result}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": TOOLS}


def main() -> None:
    rng = random.Random(SEED)
    train = [record(rng, stop_at_call=False) for _ in range(N_TRAIN)]
    evals = [record(rng, stop_at_call=k % 2 == 0) for k in range(N_EVAL)]
    for name, records in (("tools_train.jsonl", train), ("tools_eval.jsonl", evals)):
        (DATA / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (TINY / "chat_template_tools.jinja").write_text(TEMPLATE)
    print(f"wrote {N_TRAIN} + {N_EVAL} tool-use records to {DATA} and the template to {TINY}")


if __name__ == "__main__":
    main()
