"""``dynamics train | grid | analyze | figures | runs``: flags generated from ``RunConfig``, parsed into a config.

Every ``RunConfig`` field is a flag (``batch_size`` -> ``--batch-size``); ``--config FILE`` reads a
TOML file of the same keys and flags given on the command line win. Bad input prints one line
naming the field and what is allowed, and exits with status 2, before anything is written.

Exit status of ``train``: 0 completed, 1 failed, 2 bad input, 3 diverged, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd

from dynamics import grid as grids
from dynamics import runs
from dynamics.analyze_config import AnalyzeConfig
from dynamics.config import ConfigError, ConfigWarning, RunConfig, config_fields, flag
from dynamics.executors import BUSY
from dynamics.files import BAD_INPUT_ERRNOS, UnreadableFile, describe_os_error, did_you_mean, read_toml, write_atomic
from dynamics.launch import torchrun_command

EXIT_CODES = {"completed": 0, "failed": 1, "diverged": 3, "interrupted": 130}  # train's, by run status


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the usage block) and exit status 2, and no
    abbreviated flags: ``--data FILE`` must not quietly mean ``--data-seed FILE``, nor an old
    abbreviation change meaning when a flag is added."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, an unknown flag refused in one line naming the closest one the
    command has (``dynamics train: unrecognized argument --dat (did you mean '--data-seed'?)``)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser.subcommands[args.command]  # the subcommand's own flags
        flags = [option for action in command._actions for option in action.option_strings]
        first = unknown[0].partition("=")[0]
        hint = did_you_mean(first, flags) if first.startswith("--") else ""
        command.error(f"unrecognized argument{'s' if len(unknown) > 1 else ''}: {' '.join(unknown)}{hint}")
    return args


def _help(f) -> str:
    text = f.metadata["help"]
    choices = f.metadata["choices"]
    if choices and f.name != "model":
        text += f"; one of: {', '.join(choices)}"
    if f.default is not None and not isinstance(f.default, (bool, tuple)):
        text += f" (default: {f.default})"
    return text.replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, fields: Sequence | None = None) -> None:
    """One flag per field of a config dataclass (default: ``RunConfig``'s); values stay strings
    (coerced and checked by the config) and absent flags stay absent (argparse.SUPPRESS), so we
    know which ones the user gave. A field whose default is a tuple is a repeatable flag."""
    for f in config_fields() if fields is None else fields:
        name = f.metadata.get("flag") or flag(f.name)
        if f.type in ("bool", bool):
            parser.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=_help(f) + f" (default: {'on' if f.default else 'off'})")
        elif isinstance(f.default, tuple):
            parser.add_argument(name, dest=f.name, action="append", metavar="NAME=VALUE", default=argparse.SUPPRESS,
                                help=_help(f))
        else:
            parser.add_argument(name, dest=f.name, metavar=f.name.upper(), default=argparse.SUPPRESS, help=_help(f))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dynamics", description="Instrumented LoRA / LoRA-MGPO fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="also the libraries' own messages (transformers' model-load reports, weight "
                             "progress bars)")

    train = commands.add_parser("train", parents=[common], help="run one instrumented training",
                                description="Run (or resume) one instrumented training; writes runs/<run_id>/. "
                                            "Exit status: 0 completed, 1 failed, 2 bad input, 3 diverged, "
                                            "130 interrupted.")
    train.add_argument("--config", metavar="FILE", help="TOML file of config keys (flags given here win)")
    train.add_argument("--nproc", default=None, metavar="N",
                       help="train data-parallel on N processes of this machine (runs torchrun --standalone "
                            "--nproc-per-node N; --batch-size is then split N ways)")
    add_config_flags(train)

    grid = commands.add_parser("grid", parents=[common], help="run (or list) every run of a grid file",
                               description="Run every run of a grid file (rank x lr x method sweeps), skipping "
                                           "completed ones and resuming interrupted ones. Exit status: 0 all "
                                           "completed/diverged, 1 some failed, 2 bad input, 130 interrupted.")
    add_grid_arguments(grid)

    analyze = commands.add_parser("analyze", parents=[common],
                                  help="double-descent phases and Hessian sharpness of runs",
                                  description="Write phases.parquet and sharpness.parquet (with --trace, "
                                              "--density and --exact-match also trace.parquet, density.parquet "
                                              "and generations.parquet) in each run folder and print a table.")
    analyze.add_argument("paths", nargs="+", metavar="RUN_OR_RUNS_DIR", help="run folders or folders of runs")
    add_config_flags(analyze, dataclasses.fields(AnalyzeConfig))

    figures = commands.add_parser("figures", parents=[common], help="every figure from folders of runs, as PNG and PDF",
                                  description="Draw every figure the runs support into --out as NAME.png and "
                                              "NAME.pdf, plus index.md (run ids and command of each). Figures "
                                              "the runs cannot make are skipped with one line each.")
    add_figures_arguments(figures)

    export = commands.add_parser("export", parents=[common],
                                 help="a run's checkpoint as a LoRA adapter for the original base model",
                                 description="Write a checkpoint of a LoRA-family run as a peft adapter folder "
                                             "that PeftModel.from_pretrained(original base, OUT) loads; pissa and "
                                             "loraga adapters are converted off their offset base.")
    export.add_argument("run", metavar="RUN", help="run folder")
    export.add_argument("--out", required=True, metavar="DIR", help="new folder for the adapter (never replaced)")
    export.add_argument("--step", default=None, help="checkpoint step (default: the newest intact one)")

    data = commands.add_parser("data", parents=[common], help="preview a data file as training would see it",
                               description="Read a data file (JSON Lines, JSON, CSV, parquet, a folder of them, a "
                                           "datasets save_to_disk folder or a hub id), tell its format from the "
                                           "columns, and print the counts, token lengths and the first examples "
                                           "with the tokens the loss is taken on marked. Trains nothing, writes "
                                           "nothing. Exit status: 0, or 2 for data that cannot be trained on.")
    add_data_arguments(data)

    table = commands.add_parser("runs", parents=[common], help="table of runs under a folder")
    table.add_argument("runs_dir", nargs="?", default="runs", help="folder of run folders (default: runs)")
    table.add_argument("--csv", metavar="FILE", help="also write every column of the run table, at full "
                       "precision, to FILE (written whole or not at all)")
    parser.subcommands = commands.choices  # name -> its parser (parse_args names an unknown flag's closest)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Flags given, over ``--config``, over the stored config of a run resumed by ``--run-id``."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "nproc", "argv", "verbose")}
    base = read_toml(args.config, f"--config {args.config}") if args.config else {}
    values = {**{k.replace("-", "_"): v for k, v in base.items()}, **given}
    if values.get("resume") in (True, "true") and values.get("run_id"):
        stored = Path(values.get("runs_dir", "runs")) / values["run_id"] / "config.json"
        if stored.exists():
            experiment = runs.stored_config(stored.parent).experiment_dict()
            experiment.pop("data_fingerprint")  # taken from the files as they are now: an edit is seen
            values = {**experiment, **values}
    return RunConfig.from_dict(values, source=args.config or "flags")


def cmd_train(args: argparse.Namespace) -> int:
    from dynamics.training import train  # lazy: torch, transformers and peft take seconds to import

    cfg = config_from_args(args)
    nproc = int(_number("--nproc", args.nproc, int, 1)) if args.nproc is not None else 1
    launched = "WORLD_SIZE" in os.environ  # by torchrun / accelerate launch: this is one of its processes
    main_process = os.environ.get("RANK", "0") == "0"
    if nproc > 1 and not launched:
        return launch_data_parallel(cfg, nproc, args.argv)
    plan = runs.plan_run(cfg) if main_process else None  # process 0 plans; the others follow it (train)
    if plan is not None and plan.mode == "done":
        print(f"{plan.run_dir}: already {plan.status}; nothing to do", file=sys.stderr)
    try:
        run = train(cfg, on_start=lambda what: print(f"{cfg.run_dir}: {what}", file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        if main_process:
            print(f"{cfg.run_dir}: interrupted", file=sys.stderr)
        return EXIT_CODES["interrupted"]
    finally:
        if launched:
            from dynamics import distributed  # lazy: torch (imported by now, but not at CLI start-up)

            distributed.close()
    if main_process:
        print(describe(run))
    return EXIT_CODES.get(run.summary.get("status"), 1)


def launch_data_parallel(cfg: RunConfig, nproc: int, argv: Sequence[str]) -> int:
    """``--nproc N``: the same command under ``torchrun --standalone --nproc-per-node N``. Bad input
    is refused here first (exit 2, one line), and the exit status is the run's (torchrun's own is 1
    for any failed process)."""
    if cfg.batch_size % nproc:
        raise ConfigError(f"--batch-size {cfg.batch_size}: must be a multiple of --nproc {nproc} "
                          "(each process takes an equal shard of every micro-batch)")
    runs.plan_run(cfg)  # an existing run without --resume / --overwrite, or other settings: one line here
    code = subprocess.run(torchrun_command(nproc, _without_nproc(argv))).returncode
    status = runs.read_summary(cfg.run_dir).get("status") if (cfg.run_dir / "summary.json").exists() else None
    return EXIT_CODES.get(status, code or 1) if code else 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def describe(run) -> str:
    """The run folder and its final numbers, a few lines for a terminal."""
    summary = run.summary
    lines = [f"run      {run.path}", f"status   {summary.get('status')} after {summary.get('steps_done')} "
             f"of {summary.get('steps_total')} steps in {summary.get('wall_time_s', 0):.1f} s"]
    if summary.get("final_loss") is not None:
        lines.append(f"loss     {summary['final_loss']:.4f} (last step)")
    final_eval = summary.get("final_eval") or {}
    if final_eval:
        parts = [f"{k} {v:.4f}" for k, v in final_eval.items() if k != "step"]
        lines.append(f"eval     step {final_eval.get('step')}: " + ", ".join(parts))
    if summary.get("error"):
        lines.append(f"error    {summary['error']}")
    return "\n".join(lines)


def _number(flag_name: str, raw: str, kind: type, minimum: float) -> float:
    """A finite ``kind`` >= ``minimum`` from a flag's text, or a one-line ConfigError."""
    try:
        value = kind(raw)
    except (ValueError, OverflowError):
        value = None
    if value is None or not math.isfinite(value) or not value >= minimum:
        what = "an integer" if kind is int else "a finite number"
        bound = f" >= {minimum}" if math.isfinite(minimum) else ""
        raise ConfigError(f"--{flag_name} {raw}: must be {what}{bound}")
    return value


def cmd_analyze(args: argparse.Namespace) -> int:
    from dynamics.run_analysis import analyze_paths  # lazy: torch

    options = AnalyzeConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "paths", "argv", "verbose")})
    problems: list[str] = []
    table = analyze_paths(args.paths, options,
                          on_problem=lambda line: report_problem(line, problems))
    if len(table):
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return 1 if problems else 0


def cmd_runs(args: argparse.Namespace) -> int:
    if not Path(args.runs_dir).is_dir():
        raise ConfigError(f"runs_dir {args.runs_dir}: no such folder")
    frame = runs.load_runs(args.runs_dir)
    if frame.empty:
        print(f"no runs under {args.runs_dir}")
        return 0
    if args.csv:
        if Path(args.csv).is_dir() or not Path(args.csv).resolve().parent.is_dir():
            raise ConfigError(f"--csv {args.csv}: must be a file in an existing folder")
        write_atomic(args.csv, lambda tmp: frame.to_csv(tmp, index=False))
    columns = ["run_id", "method", "rank", "lr", "seed", "status", "steps", "final_loss", "eval_loss", "eval_metric",
               "double_descent", "top_eigenvalue"]
    frame = frame.reindex(columns=list(dict.fromkeys([*columns, "steps_done", "damage", "alive"])))
    healthy = frame["status"] != runs.DAMAGED
    frame["status"] = frame["status"].where(frame["alive"].ne(False) | frame["alive"].isna(), "running (no process)")
    done, total = (pd.to_numeric(frame[column], errors="coerce").astype("Int64").astype(str)
                   for column in ("steps_done", "steps"))  # whole steps, also beside a damaged row's NaN
    frame["steps"] = (done + "/" + total).where(healthy, "")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(frame[columns].to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep=""))
    return 1 if report_damaged(frame) else 0


def report_damaged(frame) -> int:
    """Print ``RUN_ID: damaged: what`` on standard error for each damaged row of a runs frame;
    returns how many there were (a command then exits 1 at the end)."""
    damaged = frame[frame["status"] == runs.DAMAGED] if "status" in frame else frame.iloc[:0]
    damages = damaged["damage"] if "damage" in damaged else [""] * len(damaged)  # no damaged run: no column
    for run_id, damage in zip(damaged["run_id"], damages):
        print(f"{run_id}: damaged: {damage}", file=sys.stderr)
    return len(damaged)


# --- data ----------------------------------------------------------------------------------------------
def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``dynamics data``: the data, the tokenizer's model, and the column mapping."""
    from dynamics.data.formats import FORMATS, Columns  # lazy: kept beside the command that reads data

    parser.add_argument("data", metavar="PATH_OR_ID", help="data file, folder of them, save_to_disk folder, or hub id")
    parser.add_argument("--model", default="smollm2-135m", help="model whose tokenizer encodes the rows "
                        "(default: smollm2-135m)")
    parser.add_argument("--seq-len", default="256", help="maximum tokens per example (default: 256)")
    parser.add_argument("--data-format", choices=FORMATS, default=None, help="row format (default: told from "
                        "the columns, as TRL names them)")
    parser.add_argument("--data-config", default=None, help="the dataset's configuration (hub ids)")
    parser.add_argument("--data-split", default=None, help="split to train on (default: train)")
    for name, default in ((f.name, f.default) for f in dataclasses.fields(Columns)):
        parser.add_argument(f"--{name}-column", default=default, metavar="NAME",
                            help=f"column that holds the {name}" + (f" (default: {default})" if default else
                                                                  " (rows scored by exact match)"))
    parser.add_argument("--examples", default="2", help="examples to show (default: 2)")


def cmd_data(args: argparse.Namespace) -> int:
    from dynamics.data.formats import Columns  # lazy: datasets and the tokenizer's libraries
    from dynamics.data.preview import prepare, report
    from dynamics.models import tokenizer_for

    seq_len = int(_number("seq-len", args.seq_len, int, 1))
    n_examples = int(_number("examples", args.examples, int, 0))
    columns = Columns(**{f.name: getattr(args, f"{f.name}_column") for f in dataclasses.fields(Columns)})
    if args.model == "tiny-llama":
        raise ConfigError("--model tiny-llama: has no tokenizer; choose a model whose tokenizer encodes the rows")
    tokenizer = tokenizer_for(args.model)
    prepared = prepare(args.data, tokenizer, seq_len, columns, args.data_format, args.data_config, args.data_split)
    print(report(prepared, tokenizer, args.data, seq_len, n_examples))
    return 0


# --- grid ----------------------------------------------------------------------------------------------
def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``dynamics grid``."""
    parser.add_argument("file", metavar="FILE", help="grid file (TOML): [base], [axes], [[exclude]], [[include]], "
                                                     "[scales.NAME]; see the grids/ folder")
    parser.add_argument("--runs-dir", default="runs", metavar="DIR", help="folder of run folders (default: runs)")
    parser.add_argument("--executor", default="local", choices=("local", "ray"),
                        help="local: worker processes on this machine (default); ray: one Ray task per run")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="local executor: runs at once, each with cpus/N torch threads (default: 1)")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray started for the sweep)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="resume failed runs from their last checkpoint (they are skipped otherwise)")
    parser.add_argument("--nproc-per-run", type=int, default=1, metavar="N",
                        help="train each run data-parallel on N processes (torchrun; N GPUs of one machine, or "
                             "of the Ray node it is placed on) (default: 1)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and what would be done; run nothing")
    parser.add_argument("--scale", metavar="NAME", help="apply the file's [scales.NAME] settings (e.g. paper)")


def cmd_grid(args: argparse.Namespace) -> int:
    """``dynamics grid``: expand, validate, then list (``--dry-run``) or run the grid."""
    grid = grids.load_grid(args.file, scale=args.scale)
    configs = grid.configs(args.runs_dir)
    if args.dry_run:
        print(grids.describe_plan(grid, configs, args.retry_failed))
        return 0
    table = grids.run_grid(configs, executor=args.executor, workers=args.workers, ray_address=args.ray_address,
                           retry_failed=args.retry_failed, nproc_per_run=args.nproc_per_run)
    code = grids.exit_status(table)
    report_damaged(table)
    for run_id, error in zip(table["run_id"], table["error"] if "error" in table else []):
        if isinstance(error, str) and error.startswith(BUSY):  # left to the process that has it: not a failure
            print(f"{run_id}: {error.partition(';')[0]}", file=sys.stderr)
    if code == 1:
        print(f"some runs failed; see their log.txt, and rerun with --retry-failed. Table: dynamics runs "
              f"{args.runs_dir}", file=sys.stderr)
    return code


# --- figures -------------------------------------------------------------------------------------------
def add_figures_arguments(parser: argparse.ArgumentParser) -> None:
    from dynamics.figure_set import FIGURE_NAMES  # lazy: matplotlib takes a second to import

    parser.add_argument("paths", nargs="*", default=["runs"], metavar="RUNS_DIR_OR_RUN",
                        help="run folders or folders of runs (default: runs)")
    parser.add_argument("--out", default="figures", metavar="DIR", help="folder for NAME.png, NAME.pdf and "
                                                                        "index.md (default: figures)")
    parser.add_argument("--only", metavar="NAME,...", help="these figures only; any of: " + ", ".join(FIGURE_NAMES))


def cmd_export(args: argparse.Namespace) -> int:
    from dynamics.export import export_adapter  # lazy: torch

    step = None if args.step is None else int(_number("step", args.step, int, 0))
    print(export_adapter(args.run, args.out, step=step))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from dynamics.figure_set import make_figures  # lazy: matplotlib

    command = " ".join(["dynamics figures", *map(str, args.paths), "--out", str(args.out)]
                       + (["--only", args.only] if args.only else []))
    problems: list[str] = []
    written = make_figures(args.paths, args.out, args.only, command=command,
                           log=lambda line: print(line, file=sys.stderr, flush=True),
                           on_problem=lambda line: report_problem(line, problems))
    for files in written.values():
        print(files[0])
    return 1 if problems else 0


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


# What the libraries print on their own for every model load: transformers' load report (e.g. the
# classifier head's MISSING keys, expected for a new head) and its "Loading weights" bar, hub
# download bars. Environment variables, read when those libraries are imported (after this, in
# this process and in the grid's workers and torchrun's processes, which inherit them); Python
# warnings (ours among them) are not affected.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def library_chatter(verbose: bool) -> None:
    """Quiet the libraries' chatter (``QUIET_ENV``, unless the user set those variables), or with
    ``verbose`` let it through (also where a quieted parent, e.g. a grid driver, passed them on)."""
    for name, value in QUIET_ENV.items():
        if not verbose:
            os.environ.setdefault(name, value)
        elif os.environ.get(name) == value:
            del os.environ[name]
    if "transformers" in sys.modules:  # imported already (main() called from Python): tell it directly
        import transformers  # lazy: only when already loaded

        if verbose:
            transformers.logging.set_verbosity_warning()
            transformers.logging.enable_progress_bar()
        else:
            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, as Ctrl-C raises KeyboardInterrupt: every command stops
    the way it stops on Ctrl-C (a run checkpoints; a grid stops its workers; analyze leaves its files
    as they were), then says so in one line. Exit status 143 (128 + SIGTERM), 130 for SIGINT."""


_received: list[int] = []  # the SIGINT / SIGTERM this command got (set by _stop_once)


def report_problem(line: str, problems: list[str]) -> None:
    """A run a command could not handle, on one line of standard error (kept in ``problems`` for
    the exit status); after a signal, the stop instead (``raise_if_stopping``)."""
    raise_if_stopping()
    problems.append(line)
    print(line, file=sys.stderr)


def raise_if_stopping() -> None:
    """Raise the stop again where a library turned it into an error of its own (a signal inside a
    native call can come back as "damaged checkpoint" or "cancelled"): once a signal came, what
    follows is the stop, not a problem of the run."""
    if _received:
        raise Terminated() if _received[0] == signal.SIGTERM else KeyboardInterrupt()


def _stop_once(signum: int, frame) -> None:
    """The first SIGINT / SIGTERM stops the command; the ones after it are ignored while it cleans
    up, so a repeated signal never ends in a traceback. (The training loop installs its own for
    the steps: there the first asks for a checkpoint and a second Ctrl-C stops at once.)"""
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
    warnings.simplefilter("always", ConfigWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(build_parser(), argv)
    args.argv = argv
    library_chatter(args.verbose)
    commands = {"train": cmd_train, "grid": cmd_grid, "analyze": cmd_analyze, "figures": cmd_figures, "runs": cmd_runs,
                "export": cmd_export, "data": cmd_data}
    handlers = {}
    _received.clear()
    if threading.current_thread() is threading.main_thread():
        handlers = {signum: signal.signal(signum, _stop_once) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_command(commands[args.command], args)
    finally:
        for signum, handler in handlers.items():  # main() called from Python: the caller's handlers back
            signal.signal(signum, handler)


def _run_command(command, args: argparse.Namespace) -> int:
    """``command(args)``, its errors and interrupts as one line and an exit status."""
    try:
        return command(args)
    except KeyboardInterrupt as stop:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)  # saying so is not interrupted again
        terminated = isinstance(stop, Terminated)
        print(f"dynamics {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except (ConfigError, UnreadableFile) as error:
        if not getattr(error, "follows_process_0", False):  # data parallel: process 0 already said why
            print(f"dynamics {args.command}: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`dynamics grid FILE --dry-run | head`): stop quietly, as cat does; stdout
        # points at devnull so that Python's flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:  # the file system said no (full, read-only, no permission): one line, what to do
        print(f"dynamics {args.command}: {describe_os_error(error)}", file=sys.stderr)
        return 2 if error.errno in BAD_INPUT_ERRNOS else 1


if __name__ == "__main__":
    sys.exit(main())
