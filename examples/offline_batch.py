"""Offline batch inference with several IAPT tenants and the base model in one
`LLM.generate` call, on the bundled demo.

    .venv/bin/python examples/offline_batch.py
"""

from pathlib import Path

from vllm import LLM, SamplingParams

from vllm_iapt import IAPTRequest

DEMO = Path(__file__).resolve().parent / "demo"
TENANTS = ["sort", "reverse", "upper", "count"]


def main() -> None:
    llm = LLM(model=str(DEMO / "model"), dtype="float32", max_model_len=256,
              additional_config={"iapt": {"max_adapters": 4}})
    adapters = {name: IAPTRequest(name, i + 1, str(DEMO / "adapters" / name)) for i, name in enumerate(TENANTS)}
    inputs = ["c a b =>", "h e f g a =>", "d d b =>"]
    prompts, requests, labels = [], [], []
    for text in inputs:
        for tenant in [None, *TENANTS]:  # None = the base model, no adapter
            prompts.append(text)
            requests.append(adapters[tenant] if tenant else None)
            labels.append(tenant or "base")
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), lora_request=requests)
    for label, prompt, out in zip(labels, prompts, outputs):
        print(f"{label:>8} | {prompt:<14} | {out.outputs[0].text!r}")


if __name__ == "__main__":
    main()
