"""A user's rows -> examples: the four row formats a data file can hold, named and detected by
the columns TRL uses, and their token-level loss masks.

| format               | columns (default names)        | loss on                                        |
| -------------------- | ------------------------------ | ---------------------------------------------- |
| ``text``             | ``text``                       | every token (causal LM), EOS appended          |
| ``prompt_completion``| ``prompt``, ``completion``     | the completion and its EOS only                |
| ``messages``         | ``messages``: [{role, content}]| the assistant turns, end-of-turn token included |
| ``classification``   | ``text``, ``label``            | the class (a sequence-classification head)     |

The detection order is TRL's: ``messages``, then ``prompt`` + ``completion``, then ``text`` (with
a ``label`` column: classification). Any column may be renamed (``Columns``), so a GLUE-style
``sentence,label`` file or an alpaca-style ``instruction/output`` one maps without editing it.

Examples are the dicts ``data.task`` collates: causal LM ``input_ids``, ``labels`` (IGNORE_INDEX
where no loss is taken), ``prompt_ids`` and ``answer`` for greedy-decoding exact match where the
rows carry an answer; classification ``input_ids`` and ``label`` (class index). ``encode_rows``
also counts what truncation did (``Accounting``), so nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dynamics.data.task import IGNORE_INDEX, Example
from dynamics.errors import ConfigError
from dynamics.user_data import DEFAULT_COLUMNS, FORMATS, Columns, detect_format  # noqa: F401  (re-exported)

CAUSAL_FORMATS = ("text", "prompt_completion", "messages")


@dataclasses.dataclass
class Accounting:
    """What encoding did to the rows: counts printed at the start and kept in ``config.json``."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0  # cut at seq_len, still with a supervised token
    dropped: int = 0  # no supervised token left after truncation
    labels: dict[str, int] = dataclasses.field(default_factory=dict)  # classification: rows per class
    lengths: list[int] = dataclasses.field(default_factory=list, repr=False)  # tokens per row, before truncation

    def length_percentiles(self) -> dict[str, int]:
        """Tokens per row before truncation: p50, p90, p99 and max (nearest rank)."""
        if not self.lengths:
            return {}
        ordered = sorted(self.lengths)
        return {"p50": _nearest_rank(ordered, 0.5), "p90": _nearest_rank(ordered, 0.9),
                "p99": _nearest_rank(ordered, 0.99), "max": ordered[-1]}

    def as_dict(self) -> dict[str, Any]:
        """What ``config.json`` keeps: the counts, the classes and the length percentiles."""
        counts = {k: v for k, v in dataclasses.asdict(self).items() if k != "lengths"}
        return {**counts, "tokens_per_row": self.length_percentiles()}


def _nearest_rank(ordered: Sequence[int], q: float) -> int:
    """The ``q`` quantile of sorted ``ordered`` by the nearest-rank rule (a value that occurs)."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def label_names(values: Iterable[Any], what: str = "--label-column") -> tuple[str, ...]:
    """The class names of a label column, sorted (numerically for integer labels); a one-line
    ConfigError for fewer than two classes or a missing label."""
    found = set()
    for value in values:
        if value is None or (isinstance(value, float) and value != value):
            raise ConfigError(f"{what}: a row has no label")
        found.add(value)
    if len(found) < 2:
        raise ConfigError(f"{what}: the training data holds {len(found)} class(es) ({', '.join(map(str, found))}); "
                          "classification needs two or more")
    numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in found)
    return tuple(str(v) for v in (sorted(found) if numeric else sorted(found, key=str)))


def encode_rows(rows: Iterable[Mapping[str, Any]], data_format: str, tokenizer, seq_len: int, columns: Columns,
                labels: Sequence[str] = (), where: str = "--data") -> tuple[list[Example], Accounting]:
    """Examples of ``rows`` in ``data_format``, each at most ``seq_len`` tokens, and the accounting.
    Rows with no supervised token after truncation are dropped (and counted). ``labels`` are the
    class names (``label_names`` of the training rows) for classification. ``where`` names the
    data in errors; a row is named by its index (from 0)."""
    encode = {"text": _encode_text, "prompt_completion": _encode_prompt_completion, "messages": _encode_messages,
              "classification": _encode_classification}[data_format]
    index = {name: i for i, name in enumerate(labels)}
    examples, counts = [], Accounting(labels={name: 0 for name in labels})
    for number, row in enumerate(rows):
        counts.rows += 1
        example, length = encode(row, tokenizer, seq_len, columns, index, f"{where}: row {number}")
        counts.lengths.append(length)
        if example is None:
            counts.dropped += 1
            continue
        counts.truncated += length > seq_len
        if columns.answer and data_format in CAUSAL_FORMATS:
            example["answer"] = _text(row, columns.answer, f"{where}: row {number}").strip()
        if data_format == "classification":
            counts.labels[labels[example["label"]]] += 1
        examples.append(example)
    counts.examples = len(examples)
    return examples, counts


# --- one row ---------------------------------------------------------------------------------------------
def _text(row: Mapping[str, Any], column: str, where: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: column {column} holds {type(value).__name__}, not text")
    return value


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _supervised(input_ids: list[int], labels: list[int], seq_len: int) -> tuple[Example | None, int]:
    """``input_ids`` / ``labels`` cut to ``seq_len``; None when no label survives the cut. Also
    the row's length before the cut."""
    length = len(input_ids)
    input_ids, labels = input_ids[:seq_len], labels[:seq_len]
    # the model predicts token t from tokens < t: a label at position 0 is never a loss term
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None, length
    return {"input_ids": input_ids, "labels": labels}, length


def _encode_text(row, tokenizer, seq_len, columns, index, where):
    ids = tokenizer(_text(row, columns.text, where))["input_ids"] + _eos(tokenizer)
    return _supervised(ids, list(ids), seq_len)


def _encode_prompt_completion(row, tokenizer, seq_len, columns, index, where):
    prompt_ids = tokenizer(_text(row, columns.prompt, where))["input_ids"]
    completion_ids = tokenizer(_text(row, columns.completion, where), add_special_tokens=False)["input_ids"]
    completion_ids += _eos(tokenizer)
    example, length = _supervised(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
                                  seq_len)
    if example is not None:
        example["prompt_ids"] = prompt_ids
    return example, length


def _encode_classification(row, tokenizer, seq_len, columns, index, where):
    label = row.get(columns.label)
    if str(label) not in index:
        raise ConfigError(f"{where}: label {label!r} is not one of the training data's classes "
                          f"({', '.join(index)})")
    text = _text(row, columns.text, where)
    ids = tokenizer(text)["input_ids"]
    # cut by the tokenizer itself, so an encoder keeps its closing special token ([SEP]) as bbc's rows do
    kept = tokenizer(text, truncation=True, max_length=seq_len)["input_ids"] if len(ids) > seq_len else ids
    return {"input_ids": kept, "label": index[str(label)]}, len(ids)


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A ``messages`` cell as a list of ``{"role", "content"}`` string pairs with at least one
    assistant turn, or a one-line ConfigError saying what it is instead."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: messages must be a non-empty list of {{role, content}}, "
                          f"not {type(value).__name__}")
    turns = []
    for number, turn in enumerate(value):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str) \
                or not isinstance(turn.get("content"), str):
            raise ConfigError(f"{where}: message {number} is not a {{role, content}} pair of strings: {turn!r:.80}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    if not any(turn["role"] == "assistant" for turn in turns):
        roles = ", ".join(turn["role"] for turn in turns)
        raise ConfigError(f"{where}: no assistant turn (roles: {roles}); nothing to learn")
    return turns


def chat_ids(tokenizer, messages: Sequence[Mapping[str, str]], generation_prompt: bool = False) -> list[int]:
    """The tokenizer's chat template applied to ``messages``, as token ids."""
    return list(tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=False,
                                              add_generation_prompt=generation_prompt))


def assistant_mask(tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool]]:
    """(token ids of the whole conversation, True on the tokens of assistant turns).

    An assistant turn's tokens are what the template adds after the conversation before it with
    the generation prompt (``<|im_start|>assistant\\n``) up to the conversation through it, so its
    end-of-turn token is included (the model learns to stop) and the role header is not. This
    needs a template whose renderings of growing conversations extend each other, as chat
    templates do; one that does not is a ConfigError rather than a wrong mask. (TRL's
    ``assistant_only_loss`` asks the template for ``{% generation %}`` markers instead, which few
    templates carry; this works on any.)"""
    ids = chat_ids(tokenizer, messages)
    mask = [False] * len(ids)
    for number, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = chat_ids(tokenizer, messages[:number], generation_prompt=True)
        end = chat_ids(tokenizer, messages[: number + 1])
        if ids[: len(end)] != end or end[: len(start)] != start:
            raise ConfigError("--data: the tokenizer's chat template does not render a conversation as the "
                              "extension of its first turns, so the assistant tokens cannot be told apart; "
                              "use prompt/completion rows instead")
        for position in range(len(start), len(end)):
            mask[position] = True
    return ids, mask


def _encode_messages(row, tokenizer, seq_len, columns, index, where):
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("--data: messages rows need a chat template, and the tokenizer of this --model has none; "
                          "use prompt/completion rows, or a model whose tokenizer has one")
    messages = check_messages(row.get(columns.messages), where)
    ids, mask = assistant_mask(tokenizer, messages)
    example, length = _supervised(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], seq_len)
    if example is not None:
        last = max(i for i, turn in enumerate(messages) if turn["role"] == "assistant")
        example["prompt_ids"] = chat_ids(tokenizer, messages[:last], generation_prompt=True)
    return example, length

