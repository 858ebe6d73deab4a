"""GSM8K-style math (reasoning-gym ``gsm_symbolic``): supervised fine-tuning on question -> worked
answer, the analogue of the paper's MetaMathQA -> GSM8K setting.

Prompt ``"Question: {question}\\nAnswer:\\n"``, target the worked solution ending in ``#### N``
followed by EOS; the loss covers target tokens only. The eval problems are drawn first from the
seeded generator and the training problems after them, skipping any question text that also
appears in the eval set, so the splits are disjoint and independent of ``n_train``.
"""

from __future__ import annotations

import re

from dynamics.config import RunConfig
from dynamics.data.task import IGNORE_INDEX, Example, TaskData

PROMPT = "Question: {question}\nAnswer:\n"
_FINAL_NUMBER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_ANY_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The number after the first ``####`` in ``text``, normalised (no commas, ``12.0`` -> ``12``)."""
    match = _FINAL_NUMBER.search(text)
    if match is None:
        return None
    return _normalise_number(match.group(1))


def last_number(text: str) -> str | None:
    """The last number anywhere in ``text``, normalised as :func:`final_number`: the lenient
    reading of a worked answer that never wrote ``#### N`` (e.g. cut by the generation budget)."""
    numbers = _ANY_NUMBER.findall(text)
    return _normalise_number(numbers[-1]) if numbers else None


def _normalise_number(raw: str) -> str:
    raw = raw.replace(",", "")
    try:
        value = float(raw)
    except ValueError:
        return raw
    return str(int(value)) if value.is_integer() else repr(value)


def encode(question: str, answer_cot: str, tokenizer, seq_len: int) -> Example | None:
    """Token ids of one problem, truncated to ``seq_len``; None when no target token fits."""
    prompt_ids = tokenizer(PROMPT.format(question=question))["input_ids"]
    target_ids = tokenizer(answer_cot, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + target_ids)[:seq_len]
    if len(input_ids) <= len(prompt_ids):
        return None
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "prompt_ids": prompt_ids,
        "answer": final_number(answer_cot),
    }


def build(cfg: RunConfig, tokenizer) -> TaskData:
    import reasoning_gym  # lazy: its many task modules load in seconds, and only gsm needs it

    if tokenizer is None:
        raise ValueError(f"--task gsm needs a tokenizer; --model {cfg.model} has none")
    problems = reasoning_gym.create_dataset("gsm_symbolic", size=cfg.n_eval + cfg.n_train, seed=cfg.data_seed)
    rows = [(item["question"], item["metadata"]["answer_cot"]) for item in problems]
    eval_rows = rows[: cfg.n_eval]
    eval_questions = {question for question, _ in eval_rows}
    train_rows = [row for row in rows[cfg.n_eval :] if row[0] not in eval_questions]

    def encode_all(selected):
        examples = (encode(q, a, tokenizer, cfg.seq_len) for q, a in selected)
        return [ex for ex in examples if ex is not None]

    def decode(generated_ids: list[int]) -> str:
        return tokenizer.decode(generated_ids, skip_special_tokens=True)

    def score(example: Example, generated_ids: list[int]) -> bool:
        return example["answer"] is not None and final_number(decode(generated_ids)) == example["answer"]

    return TaskData(
        name="gsm",
        kind="causal_lm",
        train=encode_all(train_rows),
        eval=encode_all(eval_rows),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        score_generation=score,
        decode=decode,
    )
