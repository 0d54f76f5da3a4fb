"""Real pretrained models that vllm-iapt can fetch from PyPI packages and convert locally."""
