"""Grids: expansion, ties, exclusions, ids; skip/resume/retry; faults; the local and Ray executors.

The sweeps here are tiny-llama runs of a few ms per step. Local workers fork from a server that
imports torch once per test session (a few seconds); the Ray tests share one local Ray instance."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import launch
import numpy as np
import pytest
from conftest import tiny_config
from helpers import assert_expected
from hypothesis import given, settings
from hypothesis import strategies as st

import dynamics
from dynamics import executors, runs, sweep_board
from dynamics.cli import main as cli_main
from dynamics.config import ConfigError, ConfigWarning, RunConfig
from dynamics.files import write_json
from dynamics.grid import exit_status, grid_table, load_grid, plan_action, run_grid


def main(argv):
    """``dynamics grid ARGV``."""
    return cli_main(["grid", *argv])


GRIDS = Path(__file__).resolve().parent.parent / "grids"

# Settings of the tiny runs the sweeps below train (tests/conftest.py's, eval/checkpoint every 6).
TINY = {k: v for k, v in tiny_config(Path("unused")).items() if k not in ("runs_dir", "progress")}


def write_grid(tmp_path: Path, text: str, name: str = "grid.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def toml_table(values: dict) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())


def tiny_grid(tmp_path: Path, axes: dict, **base) -> Path:
    """A grid file of tiny runs: ``TINY`` and ``base`` in [base] (less the axes), ``axes`` in [axes]."""
    base = {k: v for k, v in {**TINY, **base}.items() if k not in axes}
    return write_grid(tmp_path, f"[base]\n{toml_table(base)}\n[axes]\n{toml_table(axes)}\n")


def losses(run_dir: Path) -> np.ndarray:
    return dynamics.load_run(run_dir).metrics["loss"].to_numpy()


def reference_losses(cfg: RunConfig, root: Path) -> np.ndarray:
    """The losses of an uninterrupted run of ``cfg``, trained in this process (one thread: on a
    busy 2-core machine two threads per tiny run are many times slower)."""
    reference = dataclasses.replace(cfg, runs_dir=str(root), progress=False, threads=1)
    return dynamics.train(reference).metrics["loss"].to_numpy()


def lock_holder(lock_path: Path) -> int | None:
    """The pid of the process that has ``lock_path`` open (Linux /proc), if any."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == str(lock_path) for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    return None


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="finds the worker through /proc")


# --- expansion ---------------------------------------------------------------------------------------
def test_product_in_file_order_with_a_tie(tmp_path):
    path = write_grid(tmp_path, """
[base]
lr = 5e-4
[axes]
method = ["lora", "lora+mgpo"]
rank = [16, 64]
alpha = "rank"
""")
    assert load_grid(path).assignments() == [
        {"lr": 5e-4, "method": "lora", "rank": 16, "alpha": 16},
        {"lr": 5e-4, "method": "lora", "rank": 64, "alpha": 64},
        {"lr": 5e-4, "method": "lora+mgpo", "rank": 16, "alpha": 16},
        {"lr": 5e-4, "method": "lora+mgpo", "rank": 64, "alpha": 64},
    ]


def test_tie_to_a_field_the_grid_does_not_set_takes_its_default(tmp_path):
    path = write_grid(tmp_path, '[axes]\nseed = [0, 1]\ndata_seed = "seed"\n')
    assert [run["data_seed"] for run in load_grid(path).assignments()] == [0, 1]
    path = write_grid(tmp_path, '[axes]\nalpha = "rank"\n')
    assert load_grid(path).assignments() == [{"alpha": RunConfig().rank}]


def test_exclude_drops_product_runs_matching_every_named_field(tmp_path):
    path = write_grid(tmp_path, """
[axes]
method = ["lora", "lora+mgpo", "full"]
rank = [16, 64]
lr = [1e-4, 2e-4]
[[exclude]]
method = "full"
[[exclude]]
method = "lora+mgpo"
rank = 16
lr = [1e-4, 2e-4]
""")
    kept = {(r["method"], r["rank"], r["lr"]) for r in load_grid(path).assignments()}
    assert kept == {("lora", 16, 1e-4), ("lora", 16, 2e-4), ("lora", 64, 1e-4), ("lora", 64, 2e-4),
                    ("lora+mgpo", 64, 1e-4), ("lora+mgpo", 64, 2e-4)}


def test_include_adds_a_subgrid_that_exclusions_do_not_touch(tmp_path):
    path = write_grid(tmp_path, """
[base]
lr = 5e-4
[axes]
method = ["lora", "full"]
rank = [16, 64]
alpha = "rank"
seed = [0, 1]
[[exclude]]
method = "full"
[[include]]
method = "full"
rank = 8
alpha = 16
[[include]]
method = "lora"
rank = 4
lr = [1e-3, 2e-3]
""")
    runs_ = load_grid(path).assignments()
    assert len(runs_) == 4 + 2 + 4  # lora x rank x seed, full x seed, lora r4 x lr x seed
    full = [r for r in runs_ if r["method"] == "full"]
    assert full == [{"lr": 5e-4, "method": "full", "rank": 8, "alpha": 16, "seed": s} for s in (0, 1)]
    extra = [r for r in runs_ if r["rank"] == 4]
    assert {(r["lr"], r["seed"], r["alpha"]) for r in extra} == {(1e-3, 0, 4), (1e-3, 1, 4), (2e-3, 0, 4), (2e-3, 1, 4)}


def test_exclude_that_matches_nothing_warns(tmp_path):
    path = write_grid(tmp_path, '[axes]\nrank = [16, 64]\n[[exclude]]\nrank = 23\n')
    with pytest.warns(ConfigWarning, match=r"exclude\[0\] \{rank = 23\} matches no run"):
        assert len(load_grid(path).assignments()) == 2


def test_scale_overrides_base_axes_and_lists(tmp_path):
    path = write_grid(tmp_path, """
[base]
model = "smollm2-135m"
steps = 100
[axes]
rank = [16, 32]
alpha = "rank"
seed = [0]
[[exclude]]
rank = 32
[scales.paper.base]
model = "meta-llama/Llama-2-7b-hf"
rank = 64
[scales.paper.axes]
seed = [0, 1, 2]
steps = [1000, 2000]
[scales.paper]
exclude = []
""")
    small = load_grid(path)
    assert [(r["rank"], r["seed"]) for r in small.assignments()] == [(16, 0)]
    paper = load_grid(path, scale="paper")
    assert paper.scale == "paper"
    runs_ = paper.assignments()
    assert len(runs_) == 6
    assert all(r["model"] == "meta-llama/Llama-2-7b-hf" and r["rank"] == 64 and r["alpha"] == 64 for r in runs_)
    assert {(r["steps"], r["seed"]) for r in runs_} == {(s, seed) for s in (1000, 2000) for seed in (0, 1, 2)}


@settings(max_examples=25, deadline=None)
@given(ranks=st.lists(st.integers(1, 256), min_size=1, max_size=4, unique=True),
       lrs=st.lists(st.sampled_from([1e-4, 2e-4, 3e-4, 5e-4, 1e-3]), min_size=1, max_size=3, unique=True),
       seeds=st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True))
def test_ids_are_deterministic_unique_and_one_per_run(tmp_path_factory, ranks, lrs, seeds):
    tmp_path = tmp_path_factory.mktemp("grid")
    path = write_grid(tmp_path, f'[axes]\nrank = {ranks}\nalpha = "rank"\nlr = {lrs}\nseed = {seeds}\n')
    first = [cfg.resolved_run_id for cfg in load_grid(path).configs(tmp_path / "a")]
    again = [cfg.resolved_run_id for cfg in load_grid(path).configs(tmp_path / "b")]
    assert first == again  # not tied to the runs folder or to the process
    assert len(set(first)) == len(first) == len(ranks) * len(lrs) * len(seeds)


def test_grids_that_share_a_run_share_its_folder_and_duplicates_run_once(tmp_path):
    one = write_grid(tmp_path, '[base]\nlr = 5e-4\n[axes]\nrank = [16, 32]\nalpha = "rank"\n', "one.toml")
    two = write_grid(tmp_path, """
[axes]
rank = [32, 64]
lr = [5e-4]
[[include]]
rank = 32
alpha = 32.0
lr = 5e-4
""", "two.toml")
    ids_one = [c.resolved_run_id for c in load_grid(one).configs(tmp_path)]
    configs_two = load_grid(two).configs(tmp_path)
    ids_two = [c.resolved_run_id for c in configs_two]
    assert len(ids_two) == 3  # r32 alpha 16, r64 alpha 16, and r32 alpha 32 (included)
    assert set(ids_one) & set(ids_two) == {ids_one[1]}  # r = alpha = 32, lr 5e-4
    assert RunConfig.from_dict({"rank": 32, "alpha": 32, "lr": 5e-4}).default_run_id() == ids_one[1]
    repeated = write_grid(tmp_path, '[axes]\nrank = [16]\n[[include]]\nrank = 16\n', "repeated.toml")
    assert len(load_grid(repeated).configs(tmp_path)) == 1


@pytest.mark.parametrize(("text", "message"), [
    ("[bsae]\nlr = 1e-4\n", "unknown top-level key 'bsae' (did you mean 'base'?); allowed: description, base, axes"),
    ("[base]\nrnak = 8\n", "[base]: unknown field 'rnak' (did you mean 'rank'?)"),
    ("[axes]\nlearning_rate = [1e-4]\n", "[axes]: unknown field 'learning_rate'"),
    ("[base]\nrank = [8, 16]\n", "[base] rank: must be a single value; put lists of values under [axes]"),
    ("[axes]\nrank = 8\n", '[axes] rank: must be a non-empty list of values, or the name of a field to tie to'),
    ("[axes]\nrank = []\n", "[axes] rank: must be a non-empty list of values"),
    ("[axes]\nrank = [8, 8]\n", "[axes] rank: lists a value twice"),
    ('[axes]\nmethod = "lora"\n', "there is no field 'lora'; list values as ['lora']"),
    ('[axes]\nalpha = "rnak"\n', "there is no field 'rnak' (did you mean 'rank'?)"),
    ('[axes]\nalpha = "alpha"\n', "a field cannot be tied to itself"),
    ('[axes]\nrank = [8]\nalpha = "lr"\nlr = "seed"\n', 'alpha = "lr": lr is itself tied to seed; tie alpha to "seed"'),
    ("[base]\nrank = 8\n[axes]\nrank = [16]\n", "'rank' is in both [base] and [axes]; keep one"),
    ("[base]\nresume = true\n", "'resume' is set by dynamics grid"),
    ("[base]\nruns_dir = 'x'\n", "'runs_dir' is set by dynamics grid"),
    ("[[exclude]]\nrnak = 8\n", "exclude[0]: unknown field 'rnak' (did you mean 'rank'?)"),
    ("[[include]]\n", "include[0]: is empty; name at least one field"),
    ("exclude = 3\n", "exclude: must be a list of tables"),
    ("[scales.paper]\nmodel = 'x'\n", "[scales.paper]: unknown key 'model'; allowed: base, axes, exclude, include"),
    ("[axes]\nrank = [0, 8]\n", "run rank=0: --rank 0: must be an integer >= 1"),
    ("[axes]\nmethod = ['lora', 'lora+mgpo2']\n",
     "run method=lora+mgpo2: --method lora+mgpo2: perturbation must be one of"),
    ("[axes]\nrank = [8, 16]\n[base]\nrun_id = 'mine'\n",
     "run rank=16: run_id mine is also given to a run with other settings"),
    ("[axes\n", "not valid TOML"),
])
def test_bad_grids_raise_one_line_naming_the_field(tmp_path, text, message):
    path = write_grid(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_grid(path).configs(tmp_path)
    assert message in str(error.value)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_scale_names_the_allowed_ones(tmp_path):
    path = write_grid(tmp_path, "[scales.paper.base]\nsteps = 10\n[scales.laptop.base]\nsteps = 1\n")
    with pytest.raises(ConfigError, match=r"--scale huge: .* defines no such scale; its scales: paper, laptop$"):
        load_grid(path, scale="huge")


# --- the paper's grid files ----------------------------------------------------------------------------
PAPER_GRIDS = {  # file: (runs as written, runs at --scale paper, methods)
    "rank_sweep.toml": (9, 27, {"lora", "lora+mgpo", "full"}),
    "lr_sweep.toml": (12, 36, {"lora", "lora+mgpo", "full"}),
    "methods_bbc.toml": (9, 27, {"full", "lora", "dora", "adalora", "pissa", "rslora", "loraplus", "loraga",
                                 "lora+mgpo"}),
    # at --scale paper the gsm table adds its rank 32 and 128 rows (LoRA, LoRA-MGPO, LoRA-GA)
    "methods_gsm.toml": (11, 39, {"full", "lora", "dora", "adalora", "pissa", "rslora", "loraplus", "loraga",
                                  "lora+mgpo"}),
    "apn_ablation_gsm.toml": (3, 9, {"lora", "lora+mgpo-noapn", "lora+mgpo"}),
    "apn_ablation_bbc.toml": (3, 9, {"lora", "lora+mgpo-noapn", "lora+mgpo"}),
    "random_noise.toml": (4, 12, {"full", "lora", "lora+noise", "lora+mgpo"}),
}


@pytest.mark.parametrize("name", sorted(PAPER_GRIDS))
@pytest.mark.parametrize("scale", [None, "paper"])
def test_paper_grid_files_expand_and_validate(name, scale):
    n_small, n_paper, methods = PAPER_GRIDS[name]
    grid = load_grid(GRIDS / name, scale=scale)
    assignments = grid.assignments()
    configs = [RunConfig.from_dict(values) for values in assignments]
    assert len(configs) == (n_paper if scale else n_small)
    assert {values["method"] for values in assignments} == methods
    named = {(c.resolved_run_id, values["method"]) for c, values in zip(configs, assignments, strict=True)}
    assert len(named) == len(configs)  # every run its own id
    if scale:
        assert {c.seed for c in configs} == {0, 1, 2}
        assert all(c.model.startswith(("meta-llama/", "google-t5/")) for c in configs)
    else:
        assert all(c.model in ("smollm2-135m", "minilm-l6") for c in configs)
    if name in ("rank_sweep.toml", "lr_sweep.toml"):  # r = alpha for the low-rank runs
        assert all(c.alpha == c.rank for c in configs if c.adapter != "full")
        ranks = {16, 32, 64, 128} if name == "rank_sweep.toml" else {128}
        assert {c.rank for c in configs if c.adapter != "full"} == ranks


SHARED_RUNS = {  # tables whose [base] is one: the runs they have in common are trained once
    ("methods_gsm.toml", "apn_ablation_gsm.toml"): {"lora", "lora+mgpo"},
    ("methods_gsm.toml", "random_noise.toml"): {"full", "lora", "lora+mgpo"},
    ("apn_ablation_gsm.toml", "random_noise.toml"): {"lora", "lora+mgpo"},
    ("methods_bbc.toml", "apn_ablation_bbc.toml"): {"lora", "lora+mgpo"},
}


# at --scale paper random_noise.toml trains LLaMA-3.1-8B (the paper's Table 4): shares nothing then
@pytest.mark.parametrize(("first", "second", "scale"), [(*pair, scale) for pair in sorted(SHARED_RUNS)
                                                        for scale in (None, "paper")
                                                        if not (scale and "random_noise.toml" in pair)])
def test_tables_share_their_common_runs(first, second, scale):
    """The methods two tables both have (rank 8, every seed) are the same runs: the same ids."""

    def ids(name):
        return {(values["method"], values.get("seed", 0)): RunConfig.from_dict(values).default_run_id()
                for values in load_grid(GRIDS / name, scale=scale).assignments() if values.get("rank", 8) == 8}

    a, b = ids(first), ids(second)
    common = a.keys() & b.keys()
    assert {method for method, _ in common} == SHARED_RUNS[first, second]
    assert {key: a[key] for key in common} == {key: b[key] for key in common}


def test_tiny_grid_file_validates():
    assert len(load_grid(GRIDS / "tiny.toml").configs()) == 6


# --- what a re-run does with each run ------------------------------------------------------------------
@pytest.mark.parametrize(("status", "retry", "action"), [
    (None, False, "new"), ("running", False, "resume"), ("interrupted", False, "resume"),
    ("completed", False, "skip"), ("diverged", False, "skip"), ("diverged", True, "skip"),
    ("failed", False, "skip"), ("failed", True, "retry"),
])
def test_plan_action(tmp_path, status, retry, action):
    cfg = RunConfig.from_dict({**TINY, "runs_dir": str(tmp_path)})
    if status:
        cfg.run_dir.mkdir()
        write_json(cfg.run_dir / "config.json", {"config": cfg.to_dict()})
        write_json(cfg.run_dir / "summary.json", {"status": status})
    assert plan_action(cfg, retry_failed=retry) == action


def test_board_lines_and_eta(tmp_path):
    cfgs = [RunConfig.from_dict({**TINY, "seed": s, "runs_dir": str(tmp_path)}) for s in range(3)]
    now = [100.0]
    stream = io.StringIO()
    board = sweep_board.SweepBoard([(c, "new") for c in cfgs], stream, clock=lambda: now[0])
    ids = [c.resolved_run_id for c in cfgs]
    assert board.eta_s() is None
    board.entries[ids[0]].state, board.entries[ids[0]].steps_done = "completed", 12
    board.entries[ids[1]].state, board.entries[ids[1]].steps_done = "running", 6
    now[0] = 118.0  # 18 steps in 18 s; 6 + 12 steps left
    assert_expected(board.eta_s(), 18.0, rtol=1e-6, atol=1e-12)
    assert board.line(board.entries[ids[1]]).endswith("running step 6/12")
    assert board.counts_line() == "3 runs: 1 completed, 1 running, 1 queued | elapsed 18s | ETA 18s"
    board.finished(sweep_board.RunOutcome(ids[2], "failed", 0, "ValueError: boom"))
    assert board.line(board.entries[ids[2]]) == f"{ids[2]}  failed 0/12: ValueError: boom"
    assert stream.getvalue().splitlines()[:3] == [f"{i}  queued" for i in ids]


def test_cli_dry_run_lists_runs_and_bad_flags_exit_2(tmp_path, capsys):
    path = tiny_grid(tmp_path, {"rank": [4, 8], "alpha": "rank"}, method="lora")
    assert main([str(path), "--dry-run", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}: 2 runs in {tmp_path / 'runs'}/")
    assert out[1].split()[:2] == ["new", "lora-r4-lr0.003-s0-" + out[1].split()[1][-6:]]
    assert out[1].endswith("rank=4 alpha=4") and out[-1] == "2 new"
    assert not (tmp_path / "runs").exists()
    for argv, message in [(["--workers", "0"], "--workers 0: must be an integer >= 1"),
                          (["--executor", "ray", "--workers", "2"], "--workers 2: only used with --executor local"),
                          (["--ray-address", "auto"], "--ray-address auto: only used with --executor ray"),
                          (["--scale", "paper"], "--scale paper:")]:
        assert main([str(path), "--runs-dir", str(tmp_path / "runs"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dynamics grid: ") and message in err and err.count("\n") == 1


def test_an_empty_grid_runs_nothing(tmp_path):
    path = write_grid(tmp_path, '[axes]\nmethod = ["full"]\n[[exclude]]\nmethod = "full"\n')
    configs = load_grid(path).configs(tmp_path / "runs")
    assert configs == []
    assert run_grid(configs, progress=False).empty


def test_ray_executor_without_ray_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    configs = [RunConfig.from_dict({**TINY, "runs_dir": str(tmp_path)})]
    with pytest.raises(ConfigError, match=r"^--executor ray: Ray is not installed; pip install 'dynamics\[ray\]'$"):
        run_grid(configs, executor="ray", progress=False)
    assert not any(tmp_path.iterdir())


# --- running sweeps ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """A 2 x 2 tiny sweep run by the local executor with 2 workers."""
    tmp_path = tmp_path_factory.mktemp("local")
    path = tiny_grid(tmp_path, {"rank": [2, 4], "alpha": "rank", "lr": [3e-3, 3e-2]}, method="lora", threads=1)
    configs = load_grid(path).configs(tmp_path / "runs")
    stream = io.StringIO()
    table = run_grid(configs, workers=2, stream=stream)
    return dict(path=path, configs=configs, table=table, stream=stream.getvalue(), tmp_path=tmp_path)


def test_local_sweep_runs_every_run_like_train(local_sweep, tmp_path):
    table = local_sweep["table"]
    assert list(table["status"]) == ["completed"] * 4 and list(table["action"]) == ["new"] * 4
    assert list(table["run_id"]) == [c.resolved_run_id for c in local_sweep["configs"]]
    for cfg in local_sweep["configs"]:
        np.testing.assert_array_equal(losses(cfg.run_dir), reference_losses(cfg, tmp_path))
        assert "starting; ended completed" in (cfg.run_dir / "log.txt").read_text()
    assert "4 runs: 4 completed | elapsed" in local_sweep["stream"]
    # The "running step" line is pinned by the board test above: a 12-step run can finish between
    # two refreshes of the board.


def test_rerun_skips_completed_runs_without_touching_them(local_sweep):
    configs = local_sweep["configs"]
    before = [(runs.read_summary(c.run_dir), (c.run_dir / "log.txt").read_text()) for c in configs]
    table = run_grid(configs, workers=2, progress=False)
    assert list(table["action"]) == ["skip"] * 4 and list(table["status"]) == ["completed"] * 4
    assert [(runs.read_summary(c.run_dir), (c.run_dir / "log.txt").read_text()) for c in configs] == before


@needs_proc
def test_failures_are_recorded_and_the_sweep_goes_on_then_retry_resumes(tmp_path):
    """A worker killed mid-run (as by the OOM killer) and a run that cannot start are recorded as
    failed; the other runs complete; a re-run skips the failed ones unless --retry-failed, which
    resumes the killed run from its checkpoint to the losses of an uninterrupted run."""
    long = dict(steps=100, checkpoint_every=20, eval_every=50, n_eval_generate=0, n_train=256, lr=3e-2)
    path = write_grid(tmp_path, f"""
[base]
{toml_table({**TINY, **long, "method": "lora", "threads": 1})}
[axes]
seed = [0, 1]
[[include]]
model = "no-such-org/no-such-model"
seed = 0
""")
    configs = load_grid(path).configs(tmp_path / "runs")
    killed, survivor, unloadable = configs
    result = {}
    sweep = threading.Thread(target=lambda: result.update(table=run_grid(configs, progress=False)))
    sweep.start()
    deadline = time.monotonic() + 60
    while not runs.checkpoint_steps(killed.run_dir):
        assert time.monotonic() < deadline and sweep.is_alive()
        time.sleep(0.02)
    os.kill(lock_holder(killed.run_dir / ".lock"), signal.SIGKILL)
    sweep.join(timeout=120)
    table = result["table"].set_index("run_id")
    assert table.loc[killed.resolved_run_id, "status"] == "failed"
    assert table.loc[killed.resolved_run_id, "error"] == "worker process died (killed by SIGKILL)"
    assert runs.read_summary(killed.run_dir)["error"] == "worker process died (killed by SIGKILL)"
    assert table.loc[survivor.resolved_run_id, "status"] == "completed"
    assert table.loc[unloadable.resolved_run_id, "status"] == "failed"
    assert "--model no-such-org/no-such-model: cannot load" in table.loc[unloadable.resolved_run_id, "error"]

    again = run_grid(configs[:2], progress=False)
    assert list(again["action"]) == ["skip", "skip"]
    assert list(again["status"]) == ["failed", "completed"]

    retried = run_grid(configs[:2], retry_failed=True, progress=False)
    assert list(retried["action"]) == ["retry", "skip"]
    assert list(retried["status"]) == ["completed", "completed"]
    assert "resuming from checkpoint step" in (killed.run_dir / "log.txt").read_text()
    np.testing.assert_array_equal(losses(killed.run_dir), reference_losses(killed, tmp_path / "reference"))


@pytest.mark.slow
def test_killed_sweep_restarts_and_loses_nothing(tmp_path):
    """SIGKILL the sweep's process mid-way: its workers checkpoint and stop; a restart skips what
    completed, resumes the rest, and every run ends with the losses of an uninterrupted run."""
    path = tiny_grid(tmp_path, {"seed": [0, 1, 2, 3]}, method="lora", steps=40, checkpoint_every=10, eval_every=20,
                     n_eval_generate=0, n_train=256, lr=3e-2)
    runs_dir = tmp_path / "runs"
    configs = load_grid(path).configs(runs_dir)
    command = ["grid", str(path), "--runs-dir", str(runs_dir), "--workers", "2"]
    sweep = launch.Command(command)  # a process of its own, started fast (tests/launch.py)
    deadline = time.monotonic() + 90
    while sum(runs.run_status(c.run_dir) == "completed" for c in configs) < 1 or not any(
            runs.checkpoint_steps(c.run_dir) and runs.run_status(c.run_dir) == "running" for c in configs):
        assert time.monotonic() < deadline and sweep.poll() is None, sweep.communicate()
        time.sleep(0.02)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    done_before = {c.resolved_run_id: runs.read_summary(c.run_dir) for c in configs
                   if runs.run_status(c.run_dir) == "completed"}
    deadline = time.monotonic() + 30  # orphaned workers notice within a second, checkpoint and exit
    while any(c.run_dir.exists() and runs.read_summary(c.run_dir)["status"] == "running" for c in configs):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    statuses = {runs.read_summary(c.run_dir)["status"] for c in configs if c.run_dir.exists()}
    assert statuses <= {"completed", "interrupted"}

    restarted = launch.run(command, timeout=120)
    assert restarted.returncode == 0, restarted.stderr
    for cfg in configs:
        summary = runs.read_summary(cfg.run_dir)
        assert summary["status"] == "completed"
        if cfg.resolved_run_id in done_before:
            assert summary == done_before[cfg.resolved_run_id]  # not touched again
        np.testing.assert_array_equal(losses(cfg.run_dir), reference_losses(cfg, tmp_path / "reference"))
        assert not dynamics.load_run(cfg.run_dir).layers.duplicated(["step", "layer"]).any()


# --- Ray ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ray_executor_gives_the_local_executors_run_folders(local_sweep, local_ray, tmp_path):
    configs = load_grid(local_sweep["path"]).configs(tmp_path / "runs")
    table = run_grid(configs, executor="ray", progress=False)
    assert list(table["status"]) == ["completed"] * 4
    local = {Path(p).name: p for p in local_sweep["table"]["path"]}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(local)
    for run_id, local_path in local.items():
        ray_run, local_run = dynamics.load_run(tmp_path / "runs" / run_id), dynamics.load_run(local_path)
        np.testing.assert_array_equal(ray_run.metrics["loss"].to_numpy(), local_run.metrics["loss"].to_numpy())
        np.testing.assert_array_equal(ray_run.evals["loss"].to_numpy(), local_run.evals["loss"].to_numpy())
        assert ray_run.info["runtime"]["threads"] == local_run.info["runtime"]["threads"] == 1


@pytest.mark.slow
@needs_proc
def test_ray_worker_lost_mid_run_is_retried_from_the_checkpoint(local_ray, tmp_path):
    path = tiny_grid(tmp_path, {"seed": [0]}, method="lora", steps=200, checkpoint_every=20, eval_every=100,
                     n_eval_generate=0, n_train=256, lr=3e-2, threads=1)
    (cfg,) = load_grid(path).configs(tmp_path / "runs")
    result = {}
    sweep = threading.Thread(target=lambda: result.update(table=run_grid([cfg], executor="ray", progress=False)))
    sweep.start()
    deadline = time.monotonic() + 60
    while not runs.checkpoint_steps(cfg.run_dir):
        assert time.monotonic() < deadline and sweep.is_alive()
        time.sleep(0.02)
    pid = lock_holder(cfg.run_dir / ".lock")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    sweep.join(timeout=120)
    assert list(result["table"]["status"]) == ["completed"]
    log = (cfg.run_dir / "log.txt").read_text()
    assert "resuming from checkpoint step" in log and log.count("===") == 1  # the killed attempt wrote no log
    np.testing.assert_array_equal(losses(cfg.run_dir), reference_losses(cfg, tmp_path / "reference"))


def test_cli_runs_a_sweep_and_exits_0(local_sweep, capsys):
    assert main([str(local_sweep["path"]), "--runs-dir", str(local_sweep["tmp_path"] / "runs")]) == 0
    assert "4 runs: 4 completed" in capsys.readouterr().err


def test_a_run_another_process_claimed_is_skipped_not_failed(tmp_path, monkeypatch):
    """A lost claim race (another grid driver, or a `dynamics train` of the same run, got there
    first) is "skipped: another process has it": no traceback in the run's log.txt, and the
    sweep's exit status says nothing failed."""
    import dynamics.training

    path = tiny_grid(tmp_path, {"seed": [0, 1]}, method="lora", steps=4)
    configs = load_grid(path).configs(tmp_path / "runs")
    taken = configs[0].resolved_run_id
    real_train = dynamics.training.train

    def train_unless_taken(cfg, *args, **kwargs):
        if cfg.resolved_run_id == taken:
            raise runs.ClaimLost(f"--run-id {taken}: another process started this run first; pass --resume")
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(dynamics.training, "train", train_unless_taken)
    outcome = executors.run_one(configs[0])
    assert outcome.status == "skipped" and outcome.error.startswith(executors.BUSY)
    assert not (configs[0].run_dir / "log.txt").exists()  # not this driver's run: nothing written there
    done = executors.run_one(configs[1])
    table = grid_table(configs, {c.resolved_run_id: "new" for c in configs},
                       {outcome.run_id: outcome, done.run_id: done})
    assert exit_status(table) == 0
    assert exit_status(table.assign(error=None, status=["running", "completed"])) == 1  # without the word: unfinished
