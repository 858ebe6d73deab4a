"""A researcher's own data (issue 34, first part): the row formats and their loss masks, token by
token, and reading files, folders and ``save_to_disk`` folders through ``datasets``.

The tokenizer is the character-level one of ``conftest`` with a ChatML chat template, so every
token is one character and a mask can be read back as text.
"""

from __future__ import annotations

import json

import pytest
from conftest import char_tokenizer

from dynamics.config import ConfigError
from dynamics.data.formats import Columns, detect_format, encode_rows, label_names
from dynamics.data.task import IGNORE_INDEX
from dynamics.user_data import data_files, fingerprint, load_rows

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()  # the test's own writes of CSV / parquet files: no bars on stderr

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    tok = char_tokenizer()
    tok.chat_template = CHATML
    return tok


def supervised_text(tokenizer, example) -> str:
    """The characters the loss is taken on (labels not IGNORE_INDEX), joined."""
    ids = [label for label in example["labels"] if label != IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=False)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6, since 3+3=6"}]


@pytest.mark.parametrize(("names", "expected"), [
    (["text"], "text"), (["prompt", "completion"], "prompt_completion"), (["messages", "text"], "messages"),
    (["text", "label"], "classification"), (["prompt", "completion", "text"], "prompt_completion")])
def test_the_format_is_told_by_trls_column_names(names, expected):
    assert detect_format(names) == expected


def test_other_columns_map_by_flags_and_unknown_ones_get_one_line():
    glue = Columns(text="sentence")
    assert detect_format(["sentence", "label", "idx"], glue) == "classification"
    alpaca = Columns(prompt="instruction", completion="output")
    assert detect_format(["instruction", "input", "output"], alpaca) == "prompt_completion"
    with pytest.raises(ConfigError, match=r"^--data: none of the known column sets .* in the columns a, b; map"):
        detect_format(["b", "a"])
    with pytest.raises(ConfigError, match=r"^--data-format messages: the data has no column\(s\) messages; its col"):
        detect_format(["text"], requested="messages")
    with pytest.raises(ConfigError, match=r"^--data-format chat: must be one of text, prompt_completion"):
        detect_format(["text"], requested="chat")


def test_text_rows_take_the_loss_on_every_token_and_end_in_eos(tokenizer):
    [example], counts = encode_rows([{"text": "hello world"}], "text", tokenizer, 64, Columns())
    assert example["labels"] == example["input_ids"] and example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=True) == "hello world"
    assert (counts.rows, counts.examples, counts.truncated, counts.dropped) == (1, 1, 0, 0)


def test_prompt_completion_masks_exactly_the_prompt(tokenizer):
    row = {"prompt": "Q: 2+2?\nA:", "completion": " 4"}
    [example], _ = encode_rows([row], "prompt_completion", tokenizer, 64, Columns())
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    assert example["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert all(label != IGNORE_INDEX for label in example["labels"][len(prompt_ids):])
    assert supervised_text(tokenizer, example) == " 4" + tokenizer.eos_token
    assert example["prompt_ids"] == prompt_ids


def test_messages_take_the_loss_on_the_assistant_turns_and_their_end_of_turn_only(tokenizer):
    [example], _ = encode_rows([{"messages": CONVERSATION}], "messages", tokenizer, 512, Columns())
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=False) == rendered
    assert supervised_text(tokenizer, example) == "4<|im_end|>\n" + "6, since 3+3=6<|im_end|>\n"
    # position by position: supervised exactly where the template put an assistant's content and end
    text = rendered
    expected, cursor = [], 0
    for turn in CONVERSATION:
        header = f"<|im_start|>{turn['role']}\n"
        body = turn["content"] + "<|im_end|>\n"
        expected += [False] * len(header) + [turn["role"] == "assistant"] * len(body)
        cursor += len(header) + len(body)
    assert cursor == len(text)
    assert [label != IGNORE_INDEX for label in example["labels"]] == expected
    generation_prompt = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(example["prompt_ids"], skip_special_tokens=False) == generation_prompt


@pytest.mark.parametrize(("messages", "message"), [
    ("hi", "messages must be a non-empty list"), ([], "messages must be a non-empty list"),
    ([{"role": "user"}], "message 0 is not a {role, content} pair"),
    ([{"role": "user", "content": "hi"}], "no assistant turn (roles: user)")])
def test_a_messages_row_that_is_not_a_conversation_gets_one_line_naming_the_row(tokenizer, messages, message):
    rows = [{"messages": CONVERSATION}, {"messages": messages}]
    with pytest.raises(ConfigError, match=r"^--data: row 1: ") as error:
        encode_rows(rows, "messages", tokenizer, 512, Columns())
    assert message in str(error.value) and "\n" not in str(error.value)


def test_messages_without_a_chat_template_are_one_line():
    with pytest.raises(ConfigError, match="need a chat template"):
        encode_rows([{"messages": CONVERSATION}], "messages", char_tokenizer(), 512, Columns())


def test_classification_labels_are_the_training_sets_classes_in_order(tokenizer):
    rows = [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}, {"sentence": "fine", "label": 10}]
    names = label_names(row["label"] for row in rows)
    assert names == ("0", "1", "10")  # numerically, not as text
    examples, counts = encode_rows(rows, "classification", tokenizer, 3, Columns(text="sentence"), names)
    assert [ex["label"] for ex in examples] == [1, 0, 2] and counts.labels == {"0": 1, "1": 1, "10": 1}
    assert counts.truncated == 2 and all(len(ex["input_ids"]) <= 3 for ex in examples)  # good, fine: 4 characters
    with pytest.raises(ConfigError, match="holds 1 class"):
        label_names(["spam", "spam"])
    with pytest.raises(ConfigError, match=r"row 0: label 'ham' is not one of the training data's classes \(0, 1, 10\)"):
        encode_rows([{"sentence": "x", "label": "ham"}], "classification", tokenizer, 8, Columns("sentence"), names)


def test_truncation_is_counted_and_rows_left_with_nothing_to_learn_are_dropped(tokenizer):
    rows = [{"prompt": "p" * 10, "completion": "c" * 10}, {"prompt": "p" * 30, "completion": "c"},
            {"prompt": "p", "completion": "c"}]
    examples, counts = encode_rows(rows, "prompt_completion", tokenizer, 16, Columns())
    assert (counts.rows, counts.examples, counts.truncated, counts.dropped) == (3, 2, 1, 1)
    assert all(len(ex["input_ids"]) <= 16 for ex in examples)


# --- files -----------------------------------------------------------------------------------------------
ROWS = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(6)]


def write(path, rows=ROWS):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        frame = datasets.Dataset.from_list(rows)
        getattr(frame, {".csv": "to_csv", ".parquet": "to_parquet", ".json": "to_json"}[path.suffix])(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_each_kind_of_file_reads_as_the_same_rows(tmp_path, suffix):
    splits, source = load_rows(str(write(tmp_path / f"data{suffix}")))
    assert splits["train"].to_list() == ROWS and "eval" not in splits
    assert source["builder"] == {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}[suffix]
    assert len(source["fingerprint"]) == 16


def test_a_folder_of_files_and_a_save_to_disk_folder(tmp_path):
    write(tmp_path / "shards" / "b.jsonl", ROWS[3:])
    write(tmp_path / "shards" / "a.jsonl", ROWS[:3])
    splits, _ = load_rows(str(tmp_path / "shards"))
    assert splits["train"].to_list() == ROWS  # in name order
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                                  "test": datasets.Dataset.from_list(ROWS[4:])})
    saved.save_to_disk(str(tmp_path / "saved"))
    splits, source = load_rows(str(tmp_path / "saved"))
    assert source["builder"] == "disk" and splits["eval_split"] == "test"
    assert splits["train"].to_list() == ROWS[:4] and splits["eval"].to_list() == ROWS[4:]
    with pytest.raises(ConfigError, match="no split dev; its splits: train, test"):
        load_rows(str(tmp_path / "saved"), data_split="dev")


def test_the_fingerprint_changes_with_the_content_and_only_with_it(tmp_path):
    path = write(tmp_path / "data.jsonl")
    first = fingerprint([path])
    assert fingerprint([path]) == first
    path.write_text(path.read_text().replace("A5", "A6"))
    assert fingerprint([path]) != first


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing.jsonl", "no such file or folder"),
    (lambda d: (d / "empty.jsonl").touch() or d / "empty.jsonl", "empty file"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "not a data file; use .jsonl"),
    (lambda d: (d / "folder").mkdir() or d / "folder", "a folder with no data files"),
    (lambda d: (d / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n') and d / "bad.jsonl",
     "line 2 is not valid JSON"),
    (lambda d: (d / "list.jsonl").write_text('{"text": "a"}\n[1, 2]\n') and d / "list.jsonl",
     "line 2 holds list, not an object"),
    (lambda d: (d / "latin.csv").write_bytes(b"text\ncaf\xe9\n") and d / "latin.csv", "not UTF-8 text (line 2"),
])
def test_bad_data_is_one_line_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_rows(str(path))
    text = str(error.value)
    assert message in text and text.startswith(f"--data {path}") and "\n" not in text


def test_a_hub_id_offline_is_one_line_and_no_wait(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^--data someone/some-dataset: no such local file or folder, and the hub"):
        load_rows("someone/some-dataset")


def test_data_files_of_a_mixed_folder_are_refused(tmp_path):
    write(tmp_path / "mixed" / "a.jsonl")
    write(tmp_path / "mixed" / "b.csv")
    with pytest.raises(ConfigError, match="several kinds"):
        data_files(tmp_path / "mixed")


# --- dynamics data: the preview ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model_folder(tmp_path_factory, local_model_folder):
    """The tiny local model folder, its tokenizer given the ChatML template."""
    import shutil

    folder = tmp_path_factory.mktemp("chat-model") / "model"
    shutil.copytree(local_model_folder, folder)
    tok = char_tokenizer()
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def test_data_previews_each_format_with_the_loss_tokens_marked_and_writes_nothing(tmp_path, chat_model_folder,
                                                                                  capsys, monkeypatch):
    from dynamics.cli import main

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "pc.jsonl", [{"prompt": "Q: 2+2?", "completion": " 4"}, {"prompt": "Q: 1+1?", "completion": " 2"}])
    write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    write(tmp_path / "glue.csv", [{"sentence": "good film", "label": 1}, {"sentence": "dull", "label": 0}])
    before = sorted(p.name for p in tmp_path.iterdir())
    model = ["--model", str(chat_model_folder)]
    assert main(["data", "pc.jsonl", *model]) == 0
    out = capsys.readouterr().out
    assert "format    prompt_completion" in out
    assert "rows      2: 2 kept, 0 truncated at --seq-len 256, 0 dropped" in out
    assert "Q: 2+2?[[ 4</s>]]" in out and "10 tokens, 3 with a loss" in out
    assert main(["data", "chat.jsonl", *model, "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "format    messages" in out and "<|im_start|>assistant\n[[4<|im_end|>\n]]<|im_start|>user" in out
    assert main(["data", "glue.csv", *model, "--text-column", "sentence", "--seq-len", "4"]) == 0
    out = capsys.readouterr().out
    assert "format    classification" in out and "classes   0 1, 1 1" in out and "1 truncated at --seq-len 4" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(("argv", "message"), [
    (["glue.csv"], "none of the known column sets"),
    (["glue.csv", "--text-column", "sentence", "--data-format", "text"], None),
    (["missing.jsonl"], "no such file or folder"),
    (["glue.csv", "--seq-len", "0"], "--seq-len 0: must be an integer >= 1"),
])
def test_data_refuses_what_it_cannot_train_on_in_one_line(tmp_path, chat_model_folder, capsys, monkeypatch, argv,
                                                          message):
    from dynamics.cli import main

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "glue.csv", [{"sentence": "good film", "label": 1}, {"sentence": "dull", "label": 0}])
    code = main(["data", *argv, "--model", str(chat_model_folder)])
    err = capsys.readouterr().err.strip()
    if message is None:  # the text column given and the format forced: it previews as language modelling
        assert code == 0 and not err
        return
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


# --- train --data ----------------------------------------------------------------------------------------
def data_run(root, data, model, *extra) -> list[str]:
    return ["train", "--data", str(data), "--model", str(model), "--steps", "4", "--batch-size", "4", "--runs-dir",
            str(root / "runs"), "--no-progress", "--eval-every", "0", "--checkpoint-every", "0", *extra]


QA = [{"prompt": f"Q: {i}+{i}?", "completion": f" {2 * i}"} for i in range(40)]


def test_train_on_a_prompt_completion_file_records_the_data_and_scores_exact_match(tmp_path, chat_model_folder,
                                                                                    capsys):
    import dynamics
    from dynamics.cli import main

    data = write(tmp_path / "qa.jsonl", QA)
    assert main(data_run(tmp_path, data, chat_model_folder, "--answer-column", "completion",
                         "--n-eval-generate", "2", "--max-new-tokens", "4")) == 0
    assert (f"new run; --data {data}: prompt_completion, 36 train / 4 eval examples (eval from 0.1 of the rows "
            "(--data-seed 0)), 0 truncated, 0 dropped") in capsys.readouterr().err  # said once, at the start
    [run] = [dynamics.load_run(p) for p in dynamics.load_runs(tmp_path / "runs")["path"]]
    assert run.config["task"] == "data" and run.config["data_format"] == "prompt_completion"
    recorded = run.info["runtime"]["data"]
    assert recorded["fingerprint"] == run.config["data_fingerprint"] == fingerprint([data])
    assert recorded["train"]["examples"] == 36 and recorded["eval"]["examples"] == 4  # 10 % held out
    assert recorded["eval_from"] == "0.1 of the rows (--data-seed 0)"
    assert "exact_match" in run.evals and run.evals["exact_match"].notna().all()
    # analysed like any run: phases, the top eigenvalue at its checkpoint, exact match by greedy decoding
    assert main(["analyze", str(run.path), "--k", "1", "--batches", "1", "--max-iter", "4", "--exact-match", "2",
                 "--max-new-tokens", "4"]) == 0
    analysed = dynamics.load_run(run.path)
    assert len(analysed.sharpness) == 1 and len(analysed.generations) == 2


def test_an_edited_data_file_is_a_new_run_and_never_a_silent_resume(tmp_path, chat_model_folder, capsys):
    import dynamics
    from dynamics.cli import main

    data = write(tmp_path / "qa.jsonl", QA)
    assert main(data_run(tmp_path, data, chat_model_folder)) == 0
    assert main(data_run(tmp_path, data, chat_model_folder, "--resume")) == 0  # unchanged: already completed
    write(data, QA[:-1])
    assert main(data_run(tmp_path, data, chat_model_folder)) == 0  # its default run id is another one
    assert len(dynamics.load_runs(tmp_path / "runs")) == 2
    named = data_run(tmp_path, data, chat_model_folder, "--run-id", "mine")
    assert main(named) == 0
    write(data, QA)
    capsys.readouterr()
    assert main([*named, "--resume"]) == 2
    assert "--data-fingerprint" in capsys.readouterr().err


def test_train_on_messages_and_on_a_classification_csv(tmp_path, chat_model_folder):
    import dynamics
    from dynamics.cli import main

    chat = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 12)
    assert main(data_run(tmp_path, chat, chat_model_folder, "--eval-fraction", "0.25")) == 0
    glue = write(tmp_path / "glue.csv", [{"sentence": f"film {i}", "label": i % 2} for i in range(24)])
    assert main(data_run(tmp_path, glue, chat_model_folder, "--text-column", "sentence")) == 0
    runs_by_format = {dynamics.load_run(p).config["data_format"]: dynamics.load_run(p)
                      for p in dynamics.load_runs(tmp_path / "runs")["path"]}
    assert set(runs_by_format) == {"messages", "classification"}
    assert runs_by_format["messages"].info["runtime"]["data"]["eval"]["examples"] == 3  # a quarter of 12
    labels = runs_by_format["classification"].info["runtime"]["data"]["train"]["labels"]
    assert set(labels) == {"0", "1"} and sum(labels.values()) == 22  # 24 rows, 2 held out
    assert runs_by_format["classification"].evals["accuracy"].notna().all()


@pytest.mark.parametrize(("extra", "message"), [
    (["--task", "bbc"], "trains on your data instead of --task bbc"),
    (["--eval-fraction", "1.5"], "--eval-fraction 1.5: must be in (0, 1)"),
    (["--data-format", "messages"], "--data-format messages: the data has no column(s) messages"),
])
def test_train_data_refuses_bad_settings_in_one_line_and_writes_nothing(tmp_path, chat_model_folder, capsys, extra,
                                                                        message):
    from dynamics.cli import main

    data = write(tmp_path / "qa.jsonl", QA)
    assert main(data_run(tmp_path, data, chat_model_folder, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_eval_data_in_another_format_is_refused(tmp_path, chat_model_folder, capsys):
    from dynamics.cli import main

    data = write(tmp_path / "qa.jsonl", QA)
    other = write(tmp_path / "text.jsonl", [{"text": "hello"}] * 4)
    assert main(data_run(tmp_path, data, chat_model_folder, "--eval-data", str(other))) == 2
    assert "holds text rows, --data" in capsys.readouterr().err


def test_a_grid_over_two_data_files(tmp_path, chat_model_folder):
    import dynamics
    from dynamics.grid import load_grid, run_grid

    first = write(tmp_path / "a.jsonl", QA[:20])
    second = write(tmp_path / "b.jsonl", QA[20:])
    grid = tmp_path / "data.toml"
    grid.write_text(f'[base]\nmodel = "{chat_model_folder}"\nsteps = 3\nbatch_size = 4\neval_every = 0\n'
                    f'checkpoint_every = 0\n\n[axes]\ndata = ["{first}", "{second}"]\n')
    configs = load_grid(grid).configs(tmp_path / "runs")
    assert len({c.resolved_run_id for c in configs}) == 2 and {c.data_fingerprint for c in configs} == {
        fingerprint([first]), fingerprint([second])}
    run_grid(configs, workers=1)
    table = dynamics.load_runs(tmp_path / "runs")
    assert sorted(table["status"]) == ["completed", "completed"]


def test_data_with_nothing_left_to_learn_after_truncation_is_refused(tmp_path, chat_model_folder, capsys):
    from dynamics.cli import main

    data = write(tmp_path / "long.jsonl", [{"prompt": "x" * 40, "completion": " y"}] * 10)
    assert main(data_run(tmp_path, data, chat_model_folder, "--seq-len", "16")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"dynamics train: --data {data}: no training example left (9 rows, 9 with no supervised "
                       "token within --seq-len 16)")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_encoder_keeps_its_closing_token_when_a_row_is_cut():
    from dynamics.models import tokenizer_for

    tokenizer = tokenizer_for("minilm-l6")
    [example], counts = encode_rows([{"text": "a long article " * 20, "label": "x"}], "classification", tokenizer, 8,
                                    Columns(), ("x", "y"))
    assert len(example["input_ids"]) == 8 and example["input_ids"][-1] == tokenizer.sep_token_id
    assert counts.truncated == 1


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk"])
def test_train_on_a_parquet_file_and_a_save_to_disk_folder(tmp_path, chat_model_folder, kind):
    import dynamics
    from dynamics.cli import main

    if kind == "parquet":
        data = write(tmp_path / "qa.parquet", QA)
    else:
        data = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(QA[:32]),
                              "validation": datasets.Dataset.from_list(QA[32:])}).save_to_disk(str(data))
    assert main(data_run(tmp_path, data, chat_model_folder)) == 0
    [path] = dynamics.load_runs(tmp_path / "runs")["path"]
    recorded = dynamics.load_run(path).info["runtime"]["data"]
    expected = ("0.1 of the rows (--data-seed 0)", 36) if kind == "parquet" else ("the data's validation split", 32)
    assert (recorded["eval_from"], recorded["train"]["examples"]) == expected
