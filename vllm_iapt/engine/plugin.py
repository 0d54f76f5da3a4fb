"""The ``vllm.general_plugins`` entry point, run once in every vLLM process."""


def register() -> None:
    """Registers nothing yet: the engine integration lands with the engine issue."""
