"""A synthetic causal-LM task for tests: count up from a given token.

Vocabulary of 128 ids: 0 pad, 1 BOS, 2 separator/EOS, 3..127 content. An example is the prompt
``[BOS, s, n, SEP]`` (start token ``s``, length token ``n = 3 + L``, L in 1..12)
followed by the target ``[s, s+1, ..., s+L-1, EOS]`` (wrapping within the content ids); the loss
covers the target. Most target tokens only need the successor rule, so a two-layer model's loss
drops within a hundred steps; copying ``s`` and stopping after L tokens take longer.
"""

from __future__ import annotations

import numpy as np

from dynamics.config import RunConfig
from dynamics.data.task import IGNORE_INDEX, Example, TaskData

VOCAB_SIZE = 128
PAD, BOS, SEP = 0, 1, 2
FIRST_CONTENT_ID = 3
MAX_LENGTH = 12


def make_example(rng: np.random.Generator, seq_len: int) -> Example:
    n_content = VOCAB_SIZE - FIRST_CONTENT_ID
    length = int(rng.integers(1, min(MAX_LENGTH, seq_len - 5) + 1))
    start = int(rng.integers(0, n_content))
    prompt_ids = [BOS, FIRST_CONTENT_ID + start, FIRST_CONTENT_ID + length, SEP]
    answer = [FIRST_CONTENT_ID + (start + i) % n_content for i in range(length)]
    target_ids = [*answer, SEP]
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        "prompt_ids": prompt_ids,
        "answer": target_ids,
    }


def build(cfg: RunConfig, tokenizer=None) -> TaskData:
    rng = np.random.default_rng(cfg.data_seed)
    eval_examples = [make_example(rng, cfg.seq_len) for _ in range(cfg.n_eval)]
    held_out = {tuple(ex["input_ids"]) for ex in eval_examples}
    train: list[Example] = []
    while len(train) < cfg.n_train:
        example = make_example(rng, cfg.seq_len)
        if tuple(example["input_ids"]) not in held_out:
            train.append(example)

    def score(example: Example, generated_ids: list[int]) -> bool:
        answer = example["answer"]
        return list(generated_ids[: len(answer)]) == answer

    return TaskData(
        name="tiny",
        kind="causal_lm",
        train=train,
        eval=eval_examples,
        pad_token_id=PAD,
        eos_token_id=SEP,
        score_generation=score,
    )
