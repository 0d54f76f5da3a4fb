"""The demo's four tasks, on the same kind of input: a few lowercase letters.

    sort:    c a b  =>  a b c
    reverse: c a b  =>  b a c
    upper:   c a b  =>  C A B
    count:   c a b  =>  3

The base model is pretrained on tagged lines ("sort: c a b => a b c"); each IAPT
tenant is trained on untagged prompts ("c a b =>"), so the task comes only from
the adapter.
"""

from __future__ import annotations

import random

LETTERS = "abcdefgh"
TASKS = {
    "sort": lambda xs: " ".join(sorted(xs)),
    "reverse": lambda xs: " ".join(reversed(xs)),
    "upper": lambda xs: " ".join(x.upper() for x in xs),
    "count": lambda xs: str(len(xs)),
}


def sample_input(rng: random.Random) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]


def untagged(xs: list[str]) -> str:
    return " ".join(xs) + " =>"


def example(task: str, xs: list[str], tagged: bool) -> tuple[str, str]:
    """(prompt, completion); the completion starts with a space."""
    prompt = f"{task}: {untagged(xs)}" if tagged else untagged(xs)
    return prompt, " " + TASKS[task](xs)


def dataset(task: str, n: int, seed: int, tagged: bool = False) -> list[dict[str, str]]:
    rng = random.Random(f"{task}-{seed}")
    return [dict(zip(("prompt", "completion"), example(task, sample_input(rng), tagged))) for _ in range(n)]


def pretraining_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        task = rng.choice(list(TASKS))
        p, c = example(task, sample_input(rng), tagged=True)
        lines.append(p + c)
    return lines
