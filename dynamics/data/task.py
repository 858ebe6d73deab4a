"""``TaskData``: a task's splits and how to batch them; ``n_loss_terms`` for the step's mean loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

IGNORE_INDEX = -100  # label value that cross_entropy skips (torch's default ignore_index)

Example = dict[str, Any]


@dataclass(frozen=True)
class TaskData:
    """A task's splits and how to batch and score them."""

    name: str
    kind: str  # "causal_lm" or "classification"
    train: Sequence[Example]
    eval: Sequence[Example]
    pad_token_id: int
    label_names: tuple[str, ...] = ()
    # Scores one greedy generation: (example, generated token ids after the prompt) -> correct?
    score_generation: Callable[[Example, list[int]], bool] | None = None
    eos_token_id: int | None = None
    # Text of generated token ids (special tokens dropped), for reading generations; None: ids as text
    decode: Callable[[list[int]], str] | None = None
    # What the data was and what encoding counted (a --data task: user_task.build); config.json keeps it
    info: dict[str, Any] | None = None

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Right-padded batch: ``input_ids`` and ``attention_mask`` (B, T) with T the longest
        example; ``labels`` (B, T) with IGNORE_INDEX on prompt and padding (causal LM) or (B,)
        class indices (classification)."""
        width = max(len(ex["input_ids"]) for ex in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.kind == "causal_lm":
            labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
            for row, ex in enumerate(examples):
                labels[row, : len(ex["labels"])] = torch.tensor(ex["labels"], dtype=torch.long)
            batch["labels"] = labels
        else:
            batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        return batch

    def collate_prompts(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Left-padded prompts (B, T) for batched greedy generation."""
        width = max(len(ex["prompt_ids"]) for ex in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, ex in enumerate(examples):
            n = len(ex["prompt_ids"])
            input_ids[row, width - n :] = torch.tensor(ex["prompt_ids"], dtype=torch.long)
            attention_mask[row, width - n :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def n_loss_terms(batch: dict[str, torch.Tensor], kind: str) -> int:
    """Number of terms the loss averages over: target tokens (causal LM) or examples."""
    if kind == "causal_lm":
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return int(batch["labels"].shape[0])
