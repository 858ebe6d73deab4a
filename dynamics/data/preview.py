"""``dynamics data PATH``: what training on a data file would see, before any training.

The format detected from the columns, the rows kept, truncated and dropped at ``--seq-len``, the
classes, token-length percentiles, and the first examples with the tokens the loss is taken on
marked (as axolotl's ``preprocess --debug`` shows them), so a wrong mask is seen in seconds. It
reads the data and the model's tokenizer only: no model, no run folder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dynamics.data.formats import DEFAULT_COLUMNS, Accounting, Columns, detect_format, encode_rows, label_names
from dynamics.data.task import IGNORE_INDEX, Example
from dynamics.user_data import load_rows

OPEN, CLOSE = "[[", "]]"  # around the tokens the loss is taken on


@dataclasses.dataclass
class Prepared:
    """A data file read, its format told, and its training rows encoded."""

    data_format: str
    source: dict[str, Any]
    examples: list[Example]
    accounting: Accounting
    label_names: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()


def prepare(path_or_id: str, tokenizer, seq_len: int, columns: Columns = DEFAULT_COLUMNS,
            data_format: str | None = None, data_config: str | None = None, data_split: str | None = None) -> Prepared:
    """Read ``path_or_id`` (``user_data.load_rows``), tell its format from the columns (or check
    ``data_format``), and encode its training rows; every fault a one-line ConfigError."""
    splits, source = load_rows(path_or_id, data_config, data_split)
    train = splits["train"]
    found = detect_format(train.column_names, columns, data_format)
    names = label_names(train[columns.label]) if found == "classification" else ()
    examples, accounting = encode_rows(train, found, tokenizer, seq_len, columns, names, f"--data {path_or_id}")
    return Prepared(found, source, examples, accounting, names, tuple(train.column_names))


def marked(tokenizer, example: Example, label_names: tuple[str, ...] = ()) -> str:
    """An example's text with the supervised tokens between ``[[`` and ``]]`` (causal LM), or its
    text and class (classification: its name from ``label_names`` and its index)."""
    if "labels" not in example:
        label = example["label"]
        name = f"{label_names[label]} ({label})" if label < len(label_names) else str(label)
        return f"{tokenizer.decode(example['input_ids'], skip_special_tokens=False)}  -> class {name}"
    pieces, run, supervised = [], [], False
    for token, label in zip(example["input_ids"], example["labels"]):
        is_supervised = label != IGNORE_INDEX
        if is_supervised != supervised and run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            pieces.append(f"{OPEN}{text}{CLOSE}" if supervised else text)
            run = []
        run.append(token)
        supervised = is_supervised
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        pieces.append(f"{OPEN}{text}{CLOSE}" if supervised else text)
    return "".join(pieces)


def report(prepared: Prepared, tokenizer, path_or_id: str, seq_len: int, n_examples: int = 2) -> str:
    """The preview as text: format, counts, classes, lengths, then ``n_examples`` marked examples."""
    counts, lengths = prepared.accounting, prepared.accounting.length_percentiles()
    lines = [f"data      {path_or_id} ({prepared.source['builder']}, fingerprint {prepared.source['fingerprint']})",
             f"columns   {', '.join(prepared.columns)}",
             f"format    {prepared.data_format}",
             f"rows      {counts.rows}: {counts.examples} kept, {counts.truncated} truncated at --seq-len {seq_len}, "
             f"{counts.dropped} dropped (no supervised token left)",
             "tokens    per row before truncation: " + ", ".join(f"{k} {v}" for k, v in lengths.items())]
    if prepared.label_names:
        lines.append("classes   " + ", ".join(f"{name} {n}" for name, n in counts.labels.items()))
    for number, example in enumerate(prepared.examples[:n_examples]):
        header = f"--- example {number}: {len(example['input_ids'])} tokens"
        if "labels" in example:
            supervised = sum(label != IGNORE_INDEX for label in example["labels"][1:])
            header += f", {supervised} with a loss (between {OPEN} and {CLOSE})"
        lines += ["", header, marked(tokenizer, example, prepared.label_names)]
    return "\n".join(lines)
