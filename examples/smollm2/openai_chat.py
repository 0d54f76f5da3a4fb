"""Chat with the SmolLM2 tenants through the OpenAI API (start the server first:
``scripts/serve_smollm2.sh``).

    .venv/bin/python examples/smollm2/openai_chat.py
    .venv/bin/python examples/smollm2/openai_chat.py --base-url http://127.0.0.1:8001/v1 "Tell me about owls."

Each tenant is an OpenAI model name. The request carries the user's message only;
the tenant answers as the base model would with that tenant's long system prompt
(examples/smollm2/tasks.py), which never travels with the request.
"""

from __future__ import annotations

import argparse

from openai import OpenAI

QUESTIONS = {
    "smollm2": "Tell me about owls.",           # the base model, no adapter
    "pirate": "Tell me about owls.",
    "json": "Tell me about owls.",
    "caps": "Tell me about owls.",
    "triage": "My phone order has not arrived yet.",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("message", nargs="?", help="ask every model this instead of the built-in questions")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    served = [m.id for m in client.models.list().data]
    print("models:", ", ".join(served))
    for model, question in QUESTIONS.items():
        if model not in served:
            continue
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": args.message or question}],
            max_tokens=args.max_tokens, temperature=0)
        print(f"\n[{model}] {args.message or question}\n  -> {r.choices[0].message.content}")


if __name__ == "__main__":
    main()
