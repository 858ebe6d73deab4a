import dataclasses

import launch
import pytest

import dynamics
from dynamics.cli import main
from dynamics.config import RunConfig, flag

TINY = ["--model", "tiny-llama", "--task", "tiny", "--method", "full", "--steps", "6", "--batch-size", "4",
        "--n-train", "32", "--n-eval", "4", "--n-eval-generate", "2", "--max-new-tokens", "4", "--no-progress"]


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse usage errors and --help
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_field_with_default_and_choices(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    text = " ".join(out.split())
    for f in dataclasses.fields(RunConfig):
        assert flag(f.name) in text
    assert ("--schedule SCHEDULE learning-rate schedule after warm-up; one of: cosine, linear, constant "
            "(default: cosine)") in text
    assert "smollm2-135m, minilm-l6, tiny-llama" in text
    assert "--instrument, --no-instrument" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--lr", "fast"], "dynamics train: --lr 'fast': must be a number"),
    (["--rank", "0"], "dynamics train: --rank 0: must be an integer >= 1"),
    (["--method", "lora+nope"], "dynamics train: --method lora+nope: perturbation must be one of"),
    (["--task", "mnist"], "dynamics train: --task mnist: must be one of gsm, bbc, tiny"),
    (["--frobnicate", "1"], "dynamics train: unrecognized arguments: --frobnicate 1"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(capsys, tmp_path, argv, message):
    runs_dir = tmp_path / "runs"
    code, _, err = run_cli(capsys, "train", *TINY, "--runs-dir", str(runs_dir), *argv)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith(message)
    assert not runs_dir.exists()


def test_train_then_table_then_refuse_to_overwrite(capsys, tmp_path):
    runs_dir = str(tmp_path / "runs")
    code, out, err = run_cli(capsys, "train", *TINY, "--runs-dir", runs_dir, "--run-id", "demo")
    assert code == 0
    assert f"run      {runs_dir}/demo" in out and "status   completed after 6 of 6 steps" in out
    assert "eval     step 6: loss" in out and "new run" in err
    code, out, _ = run_cli(capsys, "runs", runs_dir)
    assert code == 0 and "demo" in out and "completed" in out and "6/6" in out
    code, _, err = run_cli(capsys, "train", *TINY, "--runs-dir", runs_dir, "--run-id", "demo")
    assert code == 2 and "exists (status completed)" in err
    code, _, err = run_cli(capsys, "train", "--run-id", "demo", "--runs-dir", runs_dir, "--resume")
    assert code == 0 and "already completed; nothing to do" in err


def test_config_file_with_flags_winning(capsys, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "tiny-llama"\ntask = "tiny"\nmethod = "full"\nsteps = 4\nbatch-size = 4\n'
                    'n_train = 16\nn_eval = 2\nlr = 1e-3\nprogress = false\n')
    code, _, _ = run_cli(capsys, "train", "--config", str(path), "--lr", "2e-3", "--runs-dir", str(tmp_path / "r"),
                         "--run-id", "x")
    assert code == 0
    run = dynamics.load_run(tmp_path / "r" / "x")
    assert run.config["lr"] == 2e-3 and run.config["steps"] == 4
    path.write_text('model = "tiny-llama"\nlearning_rate = 1e-3\n')
    code, _, err = run_cli(capsys, "train", "--config", str(path))
    assert code == 2 and "unknown key 'learning_rate'" in err


def test_diverged_run_exits_3(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", *TINY, "--lr", "1e5", "--max-grad-norm", "0", "--steps", "50",
                           "--runs-dir", str(tmp_path / "runs"))
    assert code == 3 and "status   diverged" in out


def test_runs_table_goes_to_csv_at_full_precision(capsys, tmp_path):
    import pandas as pd
    from fake_runs import write_fake_run

    write_fake_run(tmp_path / "runs", method="lora+mgpo", eval_metric=0.123456789)
    code, out, _ = run_cli(capsys, "runs", str(tmp_path / "runs"), "--csv", str(tmp_path / "runs.csv"))
    assert code == 0 and "lora+mgpo" in out
    table = pd.read_csv(tmp_path / "runs.csv")
    assert table["eval_metric"].iloc[0] == 0.123456789 and {"apn_cap", "rho", "path"} <= set(table.columns)
    code, _, err = run_cli(capsys, "runs", str(tmp_path / "runs"), "--csv", str(tmp_path / "absent" / "x.csv"))
    assert code == 2 and "--csv" in err and len(err.strip().splitlines()) == 1


def test_runs_on_a_missing_folder_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "runs", str(tmp_path / "absent"))
    assert code == 2 and "no such folder" in err


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """`dynamics grid FILE --dry-run | head`: the plan is longer than the pipe holds, the reader leaves."""
    import subprocess
    import sys

    grid = tmp_path / "long.toml"
    grid.write_text('[base]\nmodel = "tiny-llama"\ntask = "tiny"\nsteps = 2\n\n[axes]\nseed = '
                    + str(list(range(3000))) + "\n")
    process = subprocess.Popen([sys.executable, "-m", "dynamics", "grid", str(grid), "--runs-dir",
                                str(tmp_path / "runs"), "--dry-run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()
    process.stdout.close()
    error = process.stderr.read().decode()
    assert process.wait() == 1
    assert "Traceback" not in error and "BrokenPipe" not in error


@pytest.mark.slow
def test_library_chatter_only_with_verbose(tmp_path):
    """transformers' load report (a new head's MISSING keys) and its weights bar stay out of a
    command's output unless --verbose; the run's own lines are there either way."""
    args = ["train", "--model", "minilm-l6", "--task", "bbc", "--method", "lora", "--steps", "1", "--batch-size", "4",
            "--seq-len", "32", "--n-train", "8", "--n-eval", "4", "--eval-every", "0", "--no-progress"]
    quiet = launch.run([*args, "--runs-dir", str(tmp_path / "quiet")])
    verbose = launch.run([*args, "--runs-dir", str(tmp_path / "verbose"), "--verbose"])
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert "LOAD REPORT" not in quiet.stderr and "Loading weights" not in quiet.stderr
    assert quiet.stderr.strip().endswith("new run") and "status   completed" in quiet.stdout
    assert "LOAD REPORT" in verbose.stderr and "classifier.weight" in verbose.stderr


def test_abbreviated_flags_are_refused_with_the_closest_flag(capsys, tmp_path):
    """--data must not quietly mean --data-seed: no abbreviations, one line naming the closest flag."""
    code, _, err = run_cli(capsys, "train", *TINY, "--runs-dir", str(tmp_path), "--data-se", "3")
    assert code == 2 and not any(tmp_path.iterdir())
    assert err.strip() == "dynamics train: unrecognized arguments: --data-se 3 (did you mean '--data-seed'?)"
    code, _, err = run_cli(capsys, "analyze", str(tmp_path), "--max-it", "3")
    assert code == 2 and err.strip().endswith("(did you mean '--max-iter'?)") and err.count("\n") == 1


def test_a_run_id_at_the_length_limit_trains(capsys, tmp_path):
    run_id = "r" * 200
    code, _, err = run_cli(capsys, "train", *TINY, "--runs-dir", str(tmp_path), "--run-id", run_id)
    assert code == 0, err
    assert (tmp_path / run_id / "summary.json").is_file()
    code, out, _ = run_cli(capsys, "runs", str(tmp_path))
    assert code == 0 and "6/6" in out and "6/6.0" not in out
