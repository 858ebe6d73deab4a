"""Damaged run folders and odd inputs, as a class (issue 15).

Two tables drive the tests. ``DAMAGES`` lists ways a run folder gets damaged (a file cut off by a
full disk, emptied, replaced by a folder or by bytes of something else, hand-edited into the
wrong shape). Each damage is applied to a copy of a real tiny run that sits next to a healthy run,
and every command must then:

- name the damaged run on one line (``RUN_ID: damaged: ...``);
- handle the healthy run as usual;
- leave every byte of the damaged folder as it was;
- exit 1 at the end.

``ODD_TRAIN`` and ``ODD_GRID`` list values a new user types; each must give one line on standard
error, exit 2, and write nothing. Hypothesis adds random cuts of each file, so a new way of
damaging one is caught here first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import launch
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynamics
from dynamics import runs
from dynamics.cli import main

# --- the two runs every damage test starts from ----------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A folder of two finished tiny runs (LoRA r = 4, 30 steps: long enough for phase detection;
    checkpoints at 15 and 30)."""
    root = tmp_path_factory.mktemp("pristine")
    for seed in (0, 1):
        dynamics.train(tiny_config(root, method="lora", rank=4, seed=seed, run_id=f"seed{seed}", steps=30,
                                   eval_every=15, checkpoint_every=15))
    return root / "runs"


@pytest.fixture
def two_runs(pristine, tmp_path) -> tuple[Path, Path, Path]:
    """(runs folder, healthy run, run to damage): a fresh copy for each test."""
    root = tmp_path / "runs"
    shutil.copytree(pristine, root)
    return root, root / "seed0", root / "seed1"


def fingerprint(folder: Path) -> dict[str, str]:
    """Path -> sha1 of every file (and a marker for every folder) under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def to_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "oops").write_text("a folder where a file should be")


def other_parquet(path: Path) -> None:
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)


DAMAGES = {  # name -> damage to a run folder
    "summary empty": lambda run: (run / "summary.json").write_text(""),
    "summary cut off": lambda run: cut(run / "summary.json"),
    "summary a list": lambda run: (run / "summary.json").write_text("[1, 2]"),
    "summary missing": lambda run: (run / "summary.json").unlink(),
    "summary a folder": lambda run: to_folder(run / "summary.json"),
    "config a list": lambda run: (run / "config.json").write_text('[{"config": {}}]'),
    "config not an object": lambda run: (run / "config.json").write_text('{"config": 5}'),
    "config lacks keys": lambda run: (run / "config.json").write_text('{"config": {"method": "lora"}}'),
    "config cut off": lambda run: cut(run / "config.json"),
    "config not UTF-8": lambda run: (run / "config.json").write_bytes(b'{"config": "\xff\xfe"}'),
    "config a folder": lambda run: to_folder(run / "config.json"),
    "metrics garbage": lambda run: (run / "metrics.parquet").write_bytes(b"not parquet at all" * 20),
    "metrics cut off": lambda run: cut(run / "metrics.parquet"),
    "metrics other columns": lambda run: other_parquet(run / "metrics.parquet"),
    "metrics a folder": lambda run: to_folder(run / "metrics.parquet"),
    "eval cut off": lambda run: cut(run / "eval.parquet"),
    "layers garbage": lambda run: (run / "layers.parquet").write_bytes(b"PAR1" + bytes(range(256)) + b"PAR1"),
}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def damaged_lines(err: str, run_id: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{run_id}: damaged: ")]


def assert_named_once_and_untouched(code: int, err: str, run: Path, before: dict[str, str]) -> None:
    assert code == 1, err
    assert len(damaged_lines(err, run.name)) == 1, err
    assert "Traceback" not in err
    assert fingerprint(run) == before


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_runs_names_the_damaged_run_and_shows_the_others(capsys, two_runs, damage):
    root, healthy, broken = two_runs
    DAMAGES[damage](broken)
    before = fingerprint(broken)
    code, out, err = run_cli(capsys, "runs", root)
    assert_named_once_and_untouched(code, err, broken, before)
    table = dynamics.load_runs(root).set_index("run_id")
    assert table.loc["seed0", "status"] == "completed" and table.loc["seed1", "status"] == "damaged"
    assert "seed0" in out and "completed" in out and "damaged" in out  # shown, not hidden


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_analyze_goes_on_with_the_healthy_run_and_leaves_the_damaged_one_alone(capsys, two_runs, damage):
    root, healthy, broken = two_runs
    DAMAGES[damage](broken)
    before = fingerprint(broken)
    code, out, err = run_cli(capsys, "analyze", root, "--no-sharpness")
    assert_named_once_and_untouched(code, err, broken, before)
    assert (healthy / "phases.parquet").exists() and "seed0" in out


@pytest.mark.parametrize("damage", ["summary cut off", "config lacks keys", "metrics garbage"])
def test_figures_leave_the_damaged_run_out_and_name_it(capsys, two_runs, tmp_path, damage):
    root, healthy, broken = two_runs
    DAMAGES[damage](broken)
    before = fingerprint(broken)
    code, out, err = run_cli(capsys, "figures", root, "--out", tmp_path / "figs", "--only", "cost")
    assert_named_once_and_untouched(code, err, broken, before)


@pytest.mark.parametrize("damage", ["summary cut off", "config not an object"])
def test_a_grid_skips_a_damaged_run_names_it_and_exits_1(capsys, tmp_path, damage):
    base = {k: v for k, v in tiny_config(tmp_path, method="lora", rank=4).items() if k not in ("runs_dir", "progress")}
    grid = tmp_path / "grid.toml"
    grid.write_text("[base]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in base.items())
                    + "[axes]\nseed = [0, 1]\n")
    code, _, err = run_cli(capsys, "grid", grid, "--runs-dir", tmp_path / "runs")
    assert code == 0, err
    broken = next(p for p in sorted((tmp_path / "runs").iterdir()) if "-s1-" in p.name)
    DAMAGES[damage](broken)
    before = fingerprint(broken)
    code, _, err = run_cli(capsys, "grid", grid, "--runs-dir", tmp_path / "runs")
    assert_named_once_and_untouched(code, err, broken, before)


# --- checkpoints -----------------------------------------------------------------------------------------
CHECKPOINT_DAMAGES = {
    "weights cut off": lambda folder: cut(folder / "adapter_model.safetensors"),
    "weights garbage": lambda folder: (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64),
    "trainer state cut off": lambda folder: cut(folder / "trainer_state.pt"),
}


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGES))
def test_analyze_refuses_a_damaged_checkpoint_without_writing(capsys, two_runs, damage):
    root, healthy, broken = two_runs
    CHECKPOINT_DAMAGES[damage](runs.checkpoint_dir(broken, 30))
    before = fingerprint(broken)
    code, out, err = run_cli(capsys, "analyze", root, "--max-iter", "3")
    assert_named_once_and_untouched(code, err, broken, before)
    assert "checkpoint step 30 is damaged" in damaged_lines(err, "seed1")[0]
    assert len(runs.load_run(healthy).sharpness) == 1


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGES))
def test_resume_falls_back_to_the_last_intact_checkpoint(tmp_path, damage):
    cfg = tiny_config(tmp_path, method="lora", rank=4, steps=12, checkpoint_every=4, keep_checkpoints=0, run_id="r")
    reference = dynamics.train({**cfg, "run_id": "reference"}).metrics
    run = dynamics.train({**cfg, "steps": 12})
    run_dir = run.path
    summary = runs.read_summary(run_dir)
    runs.update_summary(run_dir, status="interrupted")  # as if stopped after its last checkpoint
    CHECKPOINT_DAMAGES[damage](runs.checkpoint_dir(run_dir, 12))
    with pytest.warns(UserWarning, match=r"r: checkpoint step 12 is damaged .*; resuming from step 8"):
        resumed = dynamics.train({**cfg, "resume": True})
    assert resumed.summary["status"] == "completed" and summary["status"] == "completed"
    assert resumed.metrics["loss"].tolist() == reference["loss"].tolist()  # steps 9-12 again, exactly


def test_resume_with_every_checkpoint_damaged_stops_with_one_line(capsys, tmp_path):
    cfg = tiny_config(tmp_path, method="lora", rank=4, steps=8, checkpoint_every=4, keep_checkpoints=0, run_id="r")
    run = dynamics.train(cfg)
    runs.update_summary(run.path, status="interrupted")
    for step in runs.checkpoint_steps(run.path):
        cut(runs.checkpoint_dir(run.path, step) / "trainer_state.pt")
    before = fingerprint(run.path)
    argv = ["train", *[f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if k not in ("progress",)],
            "--no-progress", "--resume"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("dynamics train:")] == [
        "dynamics train: --resume r: no intact checkpoint to resume from; delete the run folder (or use "
        "--overwrite) to start it again"]
    assert fingerprint(run.path) == before


# --- any cut of any file -----------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["config.json", "summary.json", "metrics.parquet", "eval.parquet", "layers.parquet"]),
       keep=st.floats(0, 0.99))  # at least a few bytes gone (the last one may be a newline)
def test_a_file_cut_anywhere_is_named_never_a_traceback(pristine, tmp_path_factory, name, keep):
    root = tmp_path_factory.mktemp("cut") / "runs"
    shutil.copytree(pristine, root)
    cut(root / "seed1" / name, keep)
    table = dynamics.load_runs(root).set_index("run_id")
    assert table.loc["seed0", "status"] == "completed"
    assert table.loc["seed1", "status"] == "damaged" and name.split(".")[0] in table.loc["seed1", "damage"]
    with pytest.raises(runs.DamagedRun, match=r"^seed1: damaged: "):
        dynamics.load_run(root / "seed1")


# --- odd inputs ------------------------------------------------------------------------------------------------
TINY = ["--model", "tiny-llama", "--task", "tiny", "--method", "lora", "--steps", "2", "--batch-size", "2",
        "--n-train", "8", "--n-eval", "2", "--no-progress"]


def odd_train_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra flags, start of the one-line message after 'dynamics train: ')."""
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "latin1.toml").write_bytes(b'method = "lora"  # caf\xe9\n')
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("no config.json, no tokenizer")
    return {
        "rank 1e400": (["--rank", "1e400"], "--rank '1e400': must be an integer"),
        "rank 1.5": (["--rank", "1.5"], "--rank '1.5': must be an integer"),
        "steps inf": (["--steps", "inf"], "--steps 'inf': must be an integer"),
        "lr nan": (["--lr", "nan"], "--lr nan: must be a positive number"),
        "config a folder": (["--config", tmp_path / "a-folder"], f"--config {tmp_path / 'a-folder'}: is a folder"),
        "config not UTF-8": (["--config", tmp_path / "latin1.toml"], f"--config {tmp_path / 'latin1.toml'}: not UTF-8"),
        "config missing": (["--config", tmp_path / "nope.toml"], f"--config {tmp_path / 'nope.toml'}: no such file"),
        "runs-dir a file": (["--runs-dir", tmp_path / "a-file"], f"--runs-dir {tmp_path / 'a-file'}: is a file"),
        "run-id empty": (["--run-id", ""], "--run-id '': must be a folder name"),
        "run-id newline": (["--run-id", "a\nb"], "--run-id 'a\\nb': must be a folder name"),
        "run-id parent": (["--run-id", ".."], "--run-id ..: must not start with '.'"),
        "model not a model": (["--model", tmp_path / "not-a-model", "--task", "gsm"],
                               f"--model {tmp_path / 'not-a-model'}: cannot load its tokenizer"),
        "device cuda": (["--device", "cuda"], "--device cuda: no CUDA device is available"),
    }


ODD_TRAIN_NAMES = [  # the keys of odd_train_inputs
    "rank 1e400", "rank 1.5", "steps inf", "lr nan", "config a folder", "config not UTF-8", "config missing",
    "runs-dir a file", "run-id empty", "run-id newline", "run-id parent", "model not a model", "device cuda"]


@pytest.mark.parametrize("name", ODD_TRAIN_NAMES)
def test_odd_train_inputs_get_one_line_and_exit_2_and_write_nothing(capsys, tmp_path, name):
    import torch

    if name == "device cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    flags, message = odd_train_inputs(tmp_path)[name]
    runs_dir = tmp_path / "runs"
    before = fingerprint(tmp_path)
    code, _, err = run_cli(capsys, "train", *TINY, "--runs-dir", runs_dir, *flags)
    assert code == 2
    assert err.startswith(f"dynamics train: {message}"), err
    assert "Traceback" not in err and err.count("\n") == 1
    assert fingerprint(tmp_path) == before  # no run folder, nothing else


def test_an_unknown_hub_id_offline_is_one_line(tmp_path):
    """The real hub path with HF_HUB_OFFLINE=1, read when huggingface_hub is imported: by a process
    of its own (tests/launch.py's server, started with conftest's HF_HUB_OFFLINE=1)."""
    result = launch.run(["train", "--model", "nobody/no-such-model", "--task", "gsm", "--steps", "1",
                         "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("dynamics train: --model nobody/no-such-model: cannot load")
    assert not (tmp_path / "runs").exists()


def odd_grids(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (grid file, start of the one-line message after 'dynamics grid: ')."""
    def write(name: str, content: bytes | str) -> Path:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    folder = tmp_path / "grid-folder.toml"
    folder.mkdir()
    base = '[base]\nmodel = "tiny-llama"\ntask = "tiny"\n'
    return {
        "rank 1e400": (write("big.toml", base + "[axes]\nrank = [1e400]\n"),
                       f"{tmp_path / 'big.toml'}, run (the only run): --rank inf: must be an integer"),
        "rank 1.5": (write("half.toml", base + "[axes]\nrank = [8, 1.5]\n"),
                     f"{tmp_path / 'half.toml'}, run rank=1.5: --rank 1.5: must be an integer"),
        "a folder": (folder, f"{folder}: is a folder"),
        "not UTF-8": (write("latin1.toml", b"[base]\nmodel = 'caf\xe9'\n"), f"{tmp_path / 'latin1.toml'}: not UTF-8"),
        "empty": (write("empty.toml", ""), f"{tmp_path / 'empty.toml'}: has no runs"),
        "only a description": (write("desc.toml", 'description = "x"\n'), f"{tmp_path / 'desc.toml'}: has no runs"),
        "missing": (tmp_path / "nope.toml", f"{tmp_path / 'nope.toml'}: no such file"),
    }


@pytest.mark.parametrize("name", ["rank 1e400", "rank 1.5", "a folder", "not UTF-8", "empty", "only a description",
                                  "missing"])
def test_odd_grid_files_get_one_line_and_exit_2(capsys, tmp_path, name):
    path, message = odd_grids(tmp_path)[name]
    code, _, err = run_cli(capsys, "grid", path, "--runs-dir", tmp_path / "runs", "--dry-run")
    assert code == 2
    assert err.startswith(f"dynamics grid: {message}"), err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_a_foreign_folder_is_ignored_and_a_run_without_its_config_is_named(capsys, two_runs, tmp_path):
    """A folder counts as a run by what it holds: another tool's config.json is left alone, quietly;
    a run that lost its config.json (its summary, metrics and checkpoints still there) is damaged."""
    root, healthy, lost = two_runs
    foreign = root / "another-tools-project"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"name": "not ours", "version": 3}')
    (lost / "config.json").unlink()
    code, out, err = run_cli(capsys, "runs", str(root))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{lost.name}: damaged: config.json"), lines
    assert healthy.name in out and "another-tools-project" not in out + err
    assert "not ours" in (foreign / "config.json").read_text()  # left exactly as it was
