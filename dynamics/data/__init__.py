"""Tasks: seeded, disjoint train/eval splits, tokenized once, collated into padded batches.

One module per task (``gsm``, ``bbc``, ``tiny``, and ``user_task`` for ``--data``) exposes
``build(cfg, tokenizer) -> TaskData`` (``task.py``).
Examples are plain dicts of token-id lists so they are cheap to hold, hash and slice:

- causal LM: ``input_ids`` (prompt + target), ``labels`` (-100 on prompt tokens: loss on the target
  only), and for generation scoring ``prompt_ids`` and ``answer``;
- classification: ``input_ids`` and ``label`` (class index).
"""

from __future__ import annotations

from dynamics.config import RunConfig
from dynamics.data import bbc, gsm, tiny, user_task
from dynamics.data.task import IGNORE_INDEX, Example, TaskData, n_loss_terms

__all__ = ["IGNORE_INDEX", "Example", "TaskData", "load_task", "n_loss_terms"]


def load_task(cfg: RunConfig, tokenizer=None) -> TaskData:
    """Build the task named by ``cfg.task``."""
    builders = {"gsm": gsm.build, "bbc": bbc.build, "tiny": tiny.build, "data": user_task.build}
    return builders[cfg.task](cfg, tokenizer)
