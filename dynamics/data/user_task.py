"""``--task data``: a researcher's own rows (``--data``) as a task, encoded as the built-in ones are.

Held-out rows, in order of preference: ``--eval-data`` (same format), the data's own
``validation`` / ``test`` split, else a seeded ``--eval-fraction`` of its rows (``--data-seed``;
disjoint from training by row). Of these the first ``--n-eval`` are evaluated; ``--n-train`` (default:
all) of the rest train, in the file's order. Classification labels are the training rows' classes;
with ``--answer-column`` the causal-LM rows are scored by exact match of the greedy continuation
against it: the stripped text equals the answer, or the number after its ``####`` (GSM8K's
convention, ``gsm.final_number``) equals the answer's number. What encoding counted
(``formats.Accounting``) is kept in ``info``.
"""

from __future__ import annotations

import numpy as np

from dynamics.config import ConfigError, RunConfig
from dynamics.data.formats import detect_format, encode_rows, label_names
from dynamics.data.gsm import final_number
from dynamics.data.task import Example, TaskData
from dynamics.user_data import columns_of, load_rows


def held_out(cfg: RunConfig) -> tuple[object, object, str]:
    """``(train rows, eval rows, where the eval rows come from)`` as ``datasets.Dataset``."""
    splits, _ = load_rows(cfg.data, cfg.data_config, cfg.data_split)
    train = splits["train"]
    if cfg.eval_data is not None:
        eval_splits, _ = load_rows(cfg.eval_data, flag="--eval-data")
        eval_rows = eval_splits["train"]
        found = detect_format(eval_rows.column_names, columns_of(cfg))
        if found != cfg.data_format:
            raise ConfigError(f"--eval-data {cfg.eval_data}: holds {found} rows, --data {cfg.data} holds "
                              f"{cfg.data_format}; give held-out rows in the training data's format")
        return train, eval_rows, f"--eval-data {cfg.eval_data}"
    if "eval" in splits:
        return train, splits["eval"], f"the data's {splits['eval_split']} split"
    order = np.random.default_rng(cfg.data_seed).permutation(len(train))
    n_held = max(1, round(cfg.eval_fraction * len(train))) if len(train) > 1 else 0
    held, kept = sorted(order[:n_held].tolist()), sorted(order[n_held:].tolist())
    return train.select(kept), train.select(held), f"{cfg.eval_fraction:g} of the rows (--data-seed {cfg.data_seed})"


def build(cfg: RunConfig, tokenizer) -> TaskData:
    if tokenizer is None:
        raise ConfigError(f"--data: --model {cfg.model} has no tokenizer; choose a model whose tokenizer encodes "
                          "the rows")
    train_rows, eval_rows, eval_source = held_out(cfg)
    columns = columns_of(cfg)
    classification = cfg.data_format == "classification"
    names = label_names(train_rows[columns.label]) if classification else ()
    if cfg.n_train is not None:
        train_rows = train_rows.select(range(min(cfg.n_train, len(train_rows))))
    eval_rows = eval_rows.select(range(min(cfg.n_eval, len(eval_rows))))
    train, train_counts = encode_rows(train_rows, cfg.data_format, tokenizer, cfg.seq_len, columns, names,
                                      f"--data {cfg.data}")
    evals, eval_counts = encode_rows(eval_rows, cfg.data_format, tokenizer, cfg.seq_len, columns, names,
                                     f"--eval-data {cfg.eval_data}" if cfg.eval_data else f"--data {cfg.data}")
    if not train:
        raise ConfigError(f"--data {cfg.data}: no training example left ({train_counts.rows} rows, "
                          f"{train_counts.dropped} with no supervised token within --seq-len {cfg.seq_len})")

    def decode(generated_ids: list[int]) -> str:
        return tokenizer.decode(generated_ids, skip_special_tokens=True)

    def score(example: Example, generated_ids: list[int]) -> bool:
        text = decode(generated_ids)
        if text.strip() == example["answer"]:
            return True
        final = final_number(text)  # a worked answer ending in `#### N` (GSM8K's convention) scores on N
        return final is not None and final == final_number(f"#### {example['answer']}")

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    info = {"data": cfg.data, "format": cfg.data_format, "fingerprint": cfg.data_fingerprint,
            "columns": {name: value for name, value in vars(columns).items() if value is not None},
            "eval_from": eval_source, "train": train_counts.as_dict(), "eval": eval_counts.as_dict()}
    return TaskData(name="data", kind="classification" if classification else "causal_lm", train=train,
                    eval=evals, pad_token_id=pad, label_names=names, eos_token_id=tokenizer.eos_token_id,
                    score_generation=score if cfg.answer_column and not classification else None,
                    decode=decode, info=info)


def describe_data(info: dict) -> str:
    """One line of what a data run trains on (``TaskData.info``), printed once at its start."""
    train, held = info["train"], info["eval"]
    classes = f", classes {', '.join(f'{k} {v}' for k, v in train['labels'].items())}" if train["labels"] else ""
    return (f"--data {info['data']}: {info['format']}, {train['examples']} train / {held['examples']} eval examples "
            f"(eval from {info['eval_from']}), {train['truncated']} truncated, {train['dropped']} dropped{classes}")
