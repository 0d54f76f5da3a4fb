"""Training data: JSONL of ``{"prompt", "completion"}`` or chat ``{"messages"}``.

Each example becomes the instruction exactly as the engine will see it (the
prompt tokenized with the tokenizer's special tokens, or the chat template with
the generation prompt) followed by the completion and EOS. Loss is on the
completion only; the generators pool the instruction only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    instruction_ids: list[int]
    completion_ids: list[int]


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object")
            rows.append(row)
    if not rows:
        raise DatasetError(f"{path}: no examples")
    return rows


def instruction_ids(tokenizer: PreTrainedTokenizerBase, row: dict) -> list[int]:
    """The instruction as the engine tokenizes it (completions or chat API)."""
    if "messages" in row:
        return list(tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return list(tokenizer(row["prompt"])["input_ids"])


def encode(tokenizer: PreTrainedTokenizerBase, row: dict, max_length: int, where: str = "") -> Example:
    if "messages" in row:
        msgs = row["messages"]
        if not (isinstance(msgs, list) and msgs and msgs[-1].get("role") == "assistant"):
            raise DatasetError(f"{where}: 'messages' must end with an assistant message (the target)")
        instr = instruction_ids(tokenizer, {"messages": msgs[:-1]})
        completion = msgs[-1]["content"]
    elif "prompt" in row and "completion" in row:
        instr = instruction_ids(tokenizer, row)
        completion = row["completion"]
    else:
        raise DatasetError(f"{where}: expected keys 'prompt' and 'completion', or 'messages'")
    comp = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        comp.append(tokenizer.eos_token_id)
    if not instr:
        raise DatasetError(f"{where}: empty instruction")
    if len(instr) + len(comp) > max_length:
        comp = comp[: max(0, max_length - len(instr))]
        if not comp:
            raise DatasetError(f"{where}: instruction alone is longer than max_length={max_length}")
    return Example(instr, comp)


def load_examples(tokenizer: PreTrainedTokenizerBase, path: str | Path, max_length: int) -> list[Example]:
    return [encode(tokenizer, row, max_length, f"{path}:{i + 1}") for i, row in enumerate(read_jsonl(path))]


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def collate(examples: list[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on the completion only."""
    seqs = [e.instruction_ids + e.completion_ids for e in examples]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        labels[i, len(e.instruction_ids) : len(s)] = torch.tensor(e.completion_ids)
    lengths = torch.tensor([len(e.instruction_ids) for e in examples])
    return {"input_ids": ids, "attention_mask": attn, "instruction_lengths": lengths, "labels": labels}
