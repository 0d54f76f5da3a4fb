"""``vllm serve --enable-iapt``: IAPT adapters as OpenAI model names.

The OpenAI server already knows per-request adapters as LoRA: ``--lora-modules``,
the ``model`` field, ``/v1/models`` cards, ``/v1/load_lora_adapter`` and the
resolvers. With IAPT the engine runs with vLLM LoRA off and recognises IAPT
adapters by their files, so the server reuses that plumbing and changes only
what must differ: flags (:mod:`.cli`), validation and path rules for loading
(:mod:`.models`), and a per-adapter request counter (:mod:`.metrics`). The glue
into vLLM lives in ``patches/cli_args.py`` and ``patches/serving.py``.
"""
