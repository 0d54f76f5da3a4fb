"""Talk to the demo server (scripts/demo.sh) with the official openai client:
every tenant is a model name, the base model is "demo".

    .venv/bin/python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1]
"""

import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    models = [m.id for m in client.models.list().data]
    print("models:", ", ".join(models))
    for model in models:
        r = client.completions.create(model=model, prompt="c a b =>", max_tokens=16, temperature=0)
        print(f"{model:>8} | c a b => | {r.choices[0].text!r} | prompt tokens: {r.usage.prompt_tokens}")


if __name__ == "__main__":
    main()
