"""Talk to a `vllm-t2l serve` server: for each description, the base model, the description as a system
prompt, its adapter, and its adapter at the strength the server's checkpoint recommends, answering the
same question.

    python examples/client.py [--base-url http://127.0.0.1:8000/v1] [--strength 2] [--question "..."]
"""

import argparse
import json
import sys
import urllib.request

from openai import APIConnectionError, OpenAI

DESCRIPTIONS = [
    "Talk like a pirate in every answer.",
    "Answer only in capital letters.",
    "Answer in one very short sentence.",
    "Always finish your answer with the word Bazinga.",
]


def ask(client: OpenAI, model: str, question: str, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=64, temperature=0,
                                           frequency_penalty=0.5)  # greedy 135M answers loop without a penalty
    return " ".join(reply.choices[0].message.content.split())


def recommended_strength(base_url: str) -> float:
    """The served checkpoint's recommended strength, from the studio API (2 where it says 1 or is off)."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/t2l/info", timeout=10) as reply:
            value = float(json.load(reply)["recommended_strength"])
    except (OSError, ValueError, KeyError):
        return 2.0
    return value if value != 1 else 2.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--strength", type=float, help="the higher strength to show (default: the recommended one)")
    parser.add_argument("--question", default="How do I boil an egg?")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="none")
    strength = args.strength or recommended_strength(args.base_url)
    try:
        base = client.models.list().data[0].id
    except APIConnectionError:
        sys.exit(f"no server answers at {args.base_url}: start one with `vllm-t2l serve` and wait for "
                 "'Application startup complete'")
    print(f"question: {args.question}\n\nbase model:\n  {ask(client, base, args.question)}\n")
    for description in DESCRIPTIONS:
        print(f"=== {description}")
        print(f"system prompt:\n  {ask(client, base, args.question, system=description)}")
        print(f"t2l:  (strength 1)\n  {ask(client, 't2l:' + description, args.question)}")
        strong = f"t2l[strength={strength:g}]:{description}"
        print(f"t2l[strength={strength:g}]:\n  {ask(client, strong, args.question)}\n")


if __name__ == "__main__":
    main()
