"""A researcher's own data (``--data PATH_OR_ID``): the files or dataset it names, read as rows
through Hugging Face ``datasets``, its splits, and a fingerprint of its content.

``PATH_OR_ID`` is one of:

- a ``.jsonl`` / ``.json``, ``.csv`` or ``.parquet`` file (``load_dataset("json" | "csv" |
  "parquet", data_files=...)``);
- a folder of such files, all of one kind (read in name order, as one table);
- a ``datasets`` ``save_to_disk`` folder (``load_from_disk``: a Dataset, or a DatasetDict whose
  ``train`` split trains and ``validation`` / ``test`` split evaluates);
- anything else is taken for a hub id (``load_dataset(ID, name=data_config)``), which needs a
  reachable hub: offline it is a one-line error, never a wait.

Before ``datasets`` parses a file, JSON Lines are checked line by line and text files for UTF-8,
so a malformed line is named by its number (``datasets`` would say only that the file failed).
The fingerprint hashes the bytes of every file read, so an edited file is another run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynamics.errors import ConfigError

FORMATS = ("text", "prompt_completion", "messages", "classification")  # the row formats (dynamics.data.formats)
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLITS = ("validation", "test")  # the split a dataset holds out, in the order looked for
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


@dataclasses.dataclass(frozen=True)
class Columns:
    """Which column holds what (the flags ``--text-column`` ... ``--answer-column``)."""

    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    answer: str | None = None  # a reference answer per row: exact match by greedy decoding

    def needed(self, data_format: str) -> tuple[str, ...]:
        """The columns a format reads (the answer column too, when one is named)."""
        own = {"text": (self.text,), "prompt_completion": (self.prompt, self.completion),
               "messages": (self.messages,), "classification": (self.text, self.label)}[data_format]
        return own + ((self.answer,) if self.answer else ())


DEFAULT_COLUMNS = Columns()


def detect_format(column_names: Sequence[str], columns: Columns = DEFAULT_COLUMNS, requested: str | None = None) -> str:
    """The row format of a table with ``column_names``: ``requested`` (checked against the columns)
    or the first of TRL's column sets present. A one-line ConfigError names the columns found and
    the flags that map them."""
    names = set(column_names)
    if requested is not None:
        if requested not in FORMATS:
            raise ConfigError(f"--data-format {requested}: must be one of {', '.join(FORMATS)}")
        candidates = [requested]
    else:
        candidates = ["messages", "prompt_completion", "classification", "text"]
    for data_format in candidates:
        missing = [name for name in columns.needed(data_format) if name not in names]
        if not missing:
            return data_format
        if requested is not None:
            raise ConfigError(f"--data-format {requested}: the data has no column(s) {', '.join(missing)}; its "
                              f"columns: {', '.join(sorted(names)) or 'none'} (map them with --text-column, "
                              "--label-column, --prompt-column, --completion-column, --messages-column)")
    raise ConfigError(f"--data: none of the known column sets (text; prompt + completion; messages; text + label) "
                      f"in the columns {', '.join(sorted(names)) or 'none'}; map yours with --text-column, "
                      "--prompt-column, --completion-column, --messages-column or --label-column")


def data_files(path: str | os.PathLike, flag: str = "--data") -> tuple[str, list[Path]]:
    """``(builder, files)`` for a local ``path``: ``json`` / ``csv`` / ``parquet`` and the files
    to read, or ``disk`` and the ``save_to_disk`` folder. A one-line ConfigError for a path that
    is not a data file or a folder of them."""
    path = Path(path)
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(f"{flag} {path}: not a data file; use .jsonl, .json, .csv or .parquet")
        if path.stat().st_size == 0:
            raise ConfigError(f"{flag} {path}: empty file")
        return builder, [path]
    if not path.is_dir():
        raise ConfigError(f"{flag} {path}: no such file or folder")
    if any((path / marker).is_file() for marker in SAVED_MARKERS):
        return "disk", [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in BUILDERS and p.stat().st_size)
    if not files:
        raise ConfigError(f"{flag} {path}: a folder with no data files (.jsonl, .json, .csv, .parquet) "
                          "and not a save_to_disk folder")
    kinds = {BUILDERS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise ConfigError(f"{flag} {path}: holds files of several kinds ({', '.join(sorted(kinds))}); "
                          "keep one kind per folder")
    return kinds.pop(), files


def is_local(path_or_id: str) -> bool:
    """Whether ``--data`` names something on this machine (else it is a hub id)."""
    return os.path.lexists(path_or_id) or path_or_id.startswith((".", "/", "~")) or \
        Path(path_or_id).suffix.lower() in BUILDERS


def fingerprint(files: list[Path]) -> str:
    """sha256 (first 16 hex digits) over every file's name relative to its folder and bytes;
    a ``save_to_disk`` folder counts every file in it."""
    digest = hashlib.sha256()
    for top in files:
        members = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for member in members:
            digest.update(str(member.relative_to(top if top.is_dir() else top.parent)).encode() + b"\0")
            with open(member, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def check_text_files(builder: str, files: list[Path], flag: str = "--data") -> None:
    """UTF-8 text and, for JSON Lines, one JSON object per non-empty line: a one-line ConfigError
    naming the file and the line otherwise (``datasets`` names neither)."""
    if builder not in ("json", "csv"):
        return
    for path in files:
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            raise ConfigError(f"{flag} {path}: not UTF-8 text (line {line}, byte {error.start})") from None
        if builder == "json" and path.suffix.lower() == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{flag} {path}: line {number} is not valid JSON ({error.msg})") from None
                if not isinstance(value, dict):
                    raise ConfigError(f"{flag} {path}: line {number} holds {type(value).__name__}, not an object")


def load_rows(path_or_id: str, data_config: str | None = None, data_split: str | None = None,
              flag: str = "--data") -> tuple[dict[str, Any], dict[str, Any]]:
    """``(splits, source)``: split name -> ``datasets.Dataset`` (``train`` always; a
    ``validation`` / ``test`` split where the data has one), and what was read (``builder``,
    ``files``, ``fingerprint``; a hub id's ``revision`` fingerprint from ``datasets``)."""
    import datasets  # lazy: `datasets` imports pyarrow, fsspec and more; only runs with --data need it

    datasets.disable_progress_bars()
    if not is_local(path_or_id):
        return _load_hub(path_or_id, data_config, data_split, flag)
    builder, files = data_files(path_or_id, flag)
    if builder == "disk":
        loaded = datasets.load_from_disk(str(files[0]))
    else:
        check_text_files(builder, files, flag)
        try:
            loaded = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
        except Exception as error:  # noqa: BLE001  (the parser's own error, in one line)
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"{flag} {path_or_id}: cannot be read as {builder} ({first})") from None
    splits = _splits(loaded, data_split, f"{flag} {path_or_id}")
    source = {"builder": builder, "files": [str(p) for p in files], "fingerprint": fingerprint(files)}
    return splits, source


def _splits(loaded, data_split: str | None, where: str) -> dict[str, Any]:
    """A Dataset is the train split; a DatasetDict gives ``data_split`` (default ``train``) and
    its first held-out split."""
    if not hasattr(loaded, "keys"):
        return {"train": loaded}
    train_name = data_split or "train"
    if train_name not in loaded:
        raise ConfigError(f"{where}: no split {train_name}; its splits: {', '.join(loaded)} (choose with --data-split)")
    splits = {"train": loaded[train_name]}
    for name in EVAL_SPLITS:
        if name in loaded and name != train_name:
            splits["eval"] = loaded[name]
            splits["eval_split"] = name
            break
    return splits


def _load_hub(dataset_id: str, data_config: str | None, data_split: str | None, flag: str):
    import datasets  # lazy: see load_rows

    try:
        loaded = datasets.load_dataset(dataset_id, name=data_config)
    except Exception as error:  # noqa: BLE001  (offline, unknown id, gated: the hub's reason in one line)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{flag} {dataset_id}: no such local file or folder, and the hub did not give it "
                          f"({first[:200]})") from None
    splits = _splits(loaded, data_split, f"{flag} {dataset_id}")
    revision = getattr(splits["train"], "_fingerprint", None)
    return splits, {"builder": "hub", "files": [dataset_id], "fingerprint": revision, "config": data_config}


def columns_of(cfg) -> Columns:
    """The column mapping a RunConfig names (``--text-column`` ... ``--answer-column``)."""
    return Columns(text=cfg.text_column, label=cfg.label_column, prompt=cfg.prompt_column,
                   completion=cfg.completion_column, messages=cfg.messages_column, answer=cfg.answer_column)


def sniff(cfg) -> tuple[str, str]:
    """``(data_format, fingerprint)`` of ``cfg.data``: the format told from its training split's
    columns (or ``cfg.data_format`` checked against them), and its content fingerprint."""
    splits, source = load_rows(cfg.data, cfg.data_config, cfg.data_split)
    data_format = detect_format(splits["train"].column_names, columns_of(cfg), cfg.data_format)
    return data_format, source["fingerprint"] or "unknown"
