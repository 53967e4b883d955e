"""Talk to a `vllm-t2l serve` server: the same question under several descriptions, and a mix.

    python examples/client.py [--base-url http://127.0.0.1:8000/v1]
"""

import argparse

from openai import OpenAI

QUESTION = "How do I boil an egg?"
MODELS = [
    None,  # the base model, no adapter
    "t2l:Talk like a pirate in every answer.",
    "t2l:Answer only in capital letters.",
    "t2l:Answer in one very short sentence.",
    "t2l-mix:0.5*Talk like a pirate in every answer.||0.5*Answer in one very short sentence.",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="none")
    base = client.models.list().data[0].id
    for model in MODELS:
        reply = client.chat.completions.create(
            model=model or base, messages=[{"role": "user", "content": QUESTION}],
            max_tokens=64, temperature=0, frequency_penalty=0.5)  # greedy 135M answers loop without a penalty
        print(f"--- {model or 'base model'}\n{reply.choices[0].message.content}\n")


if __name__ == "__main__":
    main()
