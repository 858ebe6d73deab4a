"""Grids: a sweep of runs described in one small TOML file, run here or on a Ray cluster.

A grid file::

    description = "Fig. 2: training loss across ranks, r = alpha"
    [base]                  # config fields every run shares (the keys of `dynamics train --help`)
    model = "smollm2-135m"
    lr = 5e-4
    [axes]                  # field -> values; the runs are the product (last axis varies fastest)
    method = ["lora", "lora+mgpo", "full"]
    rank = [16, 32, 64, 128]
    alpha = "rank"          # a tie: each run's alpha is that run's rank (r = alpha)
    seed = [0, 1, 2]
    [[exclude]]             # drop the product runs that match every field named here
    method = "full"
    [[include]]             # add a sub-grid: these fields fixed, the other axes swept as usual
    method = "full"
    rank = 8
    alpha = 16
    [scales.paper.base]     # `--scale paper`: the same keys again, overriding the file's
    model = "meta-llama/Llama-2-7b-hf"

Semantics (the Ray Tune / W&B convention of partial assignments, made precise):

- A run's value of a field is its axis value, else the include entry's, else ``[base]``'s, else the
  config default. ``[base]`` holds single values; ``[axes]`` holds non-empty lists.
- A tie ``field = "other"`` in ``[axes]`` copies ``other``'s value in each run (its default if the
  grid does not set it). A tie cannot point at a tied field or at itself.
- ``exclude`` is a list of tables (``[[exclude]]``) mapping fields to a value or a list of values
  (any of them). A run of the product is dropped when every field the entry names has (one of) its
  values. Exclusion applies to the product only, never to included runs. An entry that matches no
  run is reported with a warning.
- ``include`` is a list of tables too: each entry is a sub-grid. The fields it names are fixed (a
  list is swept), replacing an axis or a ``[base]`` value of the same name; the other axes are swept
  as usual and ties apply unless the entry sets the tied field itself.
- ``[scales.NAME]`` takes ``base``, ``axes``, ``exclude`` and ``include`` again. ``base`` and
  ``axes`` are merged field by field over the file's (a field the scale puts in ``base`` stops being
  an axis, and the other way round); ``exclude`` and ``include`` replace the file's lists.
- A grid may set ``threads`` (CPU threads of each run; also the CPUs a Ray task asks for) and
  ``run_id``; ``runs_dir``, ``resume``, ``overwrite`` and ``progress`` belong to ``dynamics grid``.

Every run is validated by ``RunConfig`` before anything starts. Run ids are the config's default
ids (``lora-r64-lr0.0005-s0-1a2b3c``): the same settings always give the same id, so re-running a
grid finds its runs, and two grids that share a run share its folder. Runs that come out identical
(same id, same settings) are run once.

Re-running a grid (``plan_action``): ``completed`` and ``diverged`` runs are skipped (a divergence
is a result), ``running`` (killed) and ``interrupted`` ones resume from their last checkpoint,
``failed`` ones are skipped unless ``--retry-failed`` (which resumes them from their last
checkpoint; delete a run folder to start it afresh).

Command line: ``dynamics grid FILE`` (``python -m dynamics grid FILE``; the flags are in ``cli``);
exit status 0 when every run completed or diverged, 1 when some failed, 2 on bad input, 130 when
interrupted.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from dynamics import executors, runs, sweep_board
from dynamics.config import ConfigError, ConfigWarning, RunConfig, config_fields
from dynamics.files import UnreadableFile, did_you_mean, read_toml

GRID_KEYS = ("description", "base", "axes", "exclude", "include", "scales")
SCALE_KEYS = ("base", "axes", "exclude", "include")
RUNNER_FIELDS = ("runs_dir", "resume", "overwrite", "progress")  # set by `dynamics grid`, not by a file
FIELD_NAMES = tuple(f.name for f in config_fields())
DEFAULTS = {f.name: f.default for f in config_fields()}
SCALAR_TYPES = (str, int, float, bool)


# --- the grid file -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    """The sweep part of a grid file (or of one of its scales), parsed and checked.

    ``exclude`` and ``include`` entries map a field to the tuple of values it may take (any of);
    in a scale they are ``None`` when the scale leaves the file's lists as they are.
    """

    base: dict[str, Any] = field(default_factory=dict)  # field -> value
    axes: dict[str, tuple] = field(default_factory=dict)  # field -> values, in file order
    ties: dict[str, str] = field(default_factory=dict)  # field -> the field it copies
    exclude: tuple[dict[str, tuple], ...] | None = ()
    include: tuple[dict[str, tuple], ...] | None = ()


@dataclass(frozen=True)
class Grid:
    """A grid file at one scale (see the module docstring for what each part means)."""

    source: str  # the file, for messages
    sweep: Section
    scales: dict[str, Section]
    scale: str | None = None
    description: str = ""

    def at_scale(self, name: str | None) -> Grid:
        """This grid with the scale ``name``'s settings over the file's (``None``: as written)."""
        if name is None:
            return self
        if name not in self.scales:
            allowed = ", ".join(self.scales) if self.scales else "none"
            raise ConfigError(f"--scale {name}: {self.source} defines no such scale; its scales: {allowed}")
        patch, own = self.scales[name], self.sweep
        patched = set(patch.base) | set(patch.axes) | set(patch.ties)
        base = {k: v for k, v in own.base.items() if k not in patched} | patch.base
        axes = {k: v for k, v in own.axes.items() if k not in patched} | patch.axes
        ties = {k: v for k, v in own.ties.items() if k not in patched} | patch.ties
        _check_ties(ties, f"{self.source} [scales.{name}]")
        sweep = Section(base, axes, ties,
                        own.exclude if patch.exclude is None else patch.exclude,
                        own.include if patch.include is None else patch.include)
        return dataclasses.replace(self, sweep=sweep, scale=name)

    def assignments(self) -> list[dict[str, Any]]:
        """Each run's settings as the grid gives them (base, axes, includes, ties applied), in
        order: the product minus exclusions, then each include's sub-grid. Not validated."""
        sweep = self.sweep
        product = list(self._subgrid({}))
        kept = [run for run in product if not any(_matches(run, entry) for entry in sweep.exclude)]
        for i, entry in enumerate(sweep.exclude):
            if not any(_matches(run, entry) for run in product):
                warnings.warn(f"{self.source} exclude[{i}] {_show_entry(entry)} matches no run", ConfigWarning,
                              stacklevel=2)
        return kept + [run for entry in sweep.include for run in self._subgrid(entry)]

    def configs(self, runs_dir: str | os.PathLike = "runs") -> list[RunConfig]:
        """Every run as a validated ``RunConfig`` under ``runs_dir``; identical runs once.

        Raises ConfigError naming the file, the run and the field when a run is not valid, or when
        two different runs would share one (explicitly set) run id.
        """
        configs: dict[str, RunConfig] = {}
        assignments = self.assignments()
        swept = _varying_fields(assignments)
        for values in assignments:
            where = f"{self.source}, run {_show_run(values, swept)}"
            try:
                cfg = RunConfig.from_dict({**values, "runs_dir": str(runs_dir)}, source=self.source)
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
            run_id = cfg.resolved_run_id
            if run_id in configs and runs.config_differences(configs[run_id], cfg):
                raise ConfigError(f"{where}: run_id {run_id} is also given to a run with other settings; "
                                  "give each run its own run_id or leave run_id unset")
            configs.setdefault(run_id, cfg)
        return list(configs.values())

    def _subgrid(self, fixed: Mapping[str, tuple]):
        """The product of the axes with the fields in ``fixed`` swept over its values instead."""
        sweep = self.sweep
        base = {k: v for k, v in sweep.base.items() if k not in fixed}
        axes = {k: fixed.get(k, values) for k, values in sweep.axes.items()}
        axes |= {k: values for k, values in fixed.items() if k not in axes}
        ties = {k: target for k, target in sweep.ties.items() if k not in fixed}
        for combination in itertools.product(*axes.values()):
            run = {**base, **dict(zip(axes, combination, strict=True))}
            for name, target in ties.items():
                run[name] = run.get(target, DEFAULTS[target])
            yield run


def load_grid(path: str | os.PathLike, scale: str | None = None) -> Grid:
    """Read and check a grid file; ``scale`` applies ``[scales.NAME]``. Raises ConfigError."""
    source = str(path)
    try:
        raw = read_toml(path, source)
    except UnreadableFile as error:
        raise ConfigError(str(error)) from None
    _check_keys(raw, GRID_KEYS, source, "top-level key")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{source} description: must be a string")
    scales_raw = _table(raw.get("scales", {}), f"{source} [scales]")
    scales = {}
    for name, table in scales_raw.items():
        where = f"{source} [scales.{name}]"
        table = _table(table, where)
        _check_keys(table, SCALE_KEYS, where, "key")
        scales[name] = _parse_section(table, where, in_scale=True)
    grid = Grid(source, _parse_section(raw, source, in_scale=False), scales, description=description).at_scale(scale)
    if not (grid.sweep.base or grid.sweep.axes or grid.sweep.ties or grid.sweep.include):
        where = f"{source} at scale {scale}" if scale else source
        raise ConfigError(f"{where}: has no runs; give [base] settings, [axes] to sweep or [[include]] entries")
    return grid


def _parse_section(raw: Mapping[str, Any], where: str, in_scale: bool) -> Section:
    base = {}
    for key, value in _table(raw.get("base", {}), f"{where} [base]").items():
        name = _field_name(key, f"{where} [base]")
        if not isinstance(value, SCALAR_TYPES):
            raise ConfigError(f"{where} [base] {key}: must be a single value; put lists of values under [axes]")
        base[name] = value
    axes, ties = {}, {}
    for key, value in _table(raw.get("axes", {}), f"{where} [axes]").items():
        name = _field_name(key, f"{where} [axes]")
        if name in base:
            raise ConfigError(f"{where}: '{name}' is in both [base] and [axes]; keep one")
        if isinstance(value, str):
            ties[name] = _tie_target(value, name, f"{where} [axes]")
        else:
            axes[name] = _values(value, f"{where} [axes] {key}", tie_hint=True)
            if len(set(map(repr, axes[name]))) < len(axes[name]):
                raise ConfigError(f"{where} [axes] {key}: lists a value twice")
    _check_ties(ties, where)
    entries = {}
    for kind in ("exclude", "include"):
        if kind not in raw:
            entries[kind] = None if in_scale else ()
            continue
        if not isinstance(raw[kind], list):
            raise ConfigError(f"{where} {kind}: must be a list of tables ([[{kind}]] or {kind} = [{{...}}])")
        entries[kind] = tuple(_entry(table, f"{where} {kind}[{i}]") for i, table in enumerate(raw[kind]))
    return Section(base, axes, ties, entries["exclude"], entries["include"])


def _entry(table: Any, where: str) -> dict[str, tuple]:
    table = _table(table, where)
    if not table:
        raise ConfigError(f"{where}: is empty; name at least one field")
    return {_field_name(key, where): _values(value, f"{where} {key}") for key, value in table.items()}


def _values(value: Any, where: str, tie_hint: bool = False) -> tuple:
    """A value or a non-empty list of values, as a tuple of values."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, SCALAR_TYPES) for v in values) or (tie_hint and not isinstance(value, list)):
        allowed = "a non-empty list of values"
        if tie_hint:
            allowed += ', or the name of a field to tie to (alpha = "rank")'
        else:
            allowed = "a value or " + allowed
        raise ConfigError(f"{where}: must be {allowed}")
    return tuple(values)


def _tie_target(value: str, name: str, where: str) -> str:
    target = value.replace("-", "_")
    if target not in FIELD_NAMES:
        hint = did_you_mean(target, FIELD_NAMES, cutoff=0.7)  # 'lora' is a value, not 'lr'
        raise ConfigError(f'{where} {name} = "{value}": a string ties {name} to another field, and there is no '
                          f"field '{value}'{hint}; list values as [{value!r}]")
    if target == name:
        raise ConfigError(f'{where} {name} = "{value}": a field cannot be tied to itself')
    return target


def _check_ties(ties: Mapping[str, str], where: str) -> None:
    for name, target in ties.items():
        if target in ties:
            raise ConfigError(f'{where} [axes] {name} = "{target}": {target} is itself tied to '
                              f'{ties[target]}; tie {name} to "{ties[target]}" instead')


def _field_name(key: str, where: str) -> str:
    name = key.replace("-", "_")
    if name not in FIELD_NAMES:
        raise ConfigError(f"{where}: unknown field '{key}'{did_you_mean(name, FIELD_NAMES)}; "
                          "see 'dynamics train --help'")
    if name in RUNNER_FIELDS:
        raise ConfigError(f"{where}: '{key}' is set by dynamics grid (--runs-dir, --retry-failed), not by a grid file")
    return name


def _check_keys(table: Mapping[str, Any], allowed: Sequence[str], where: str, what: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown {what} '{key}'{did_you_mean(key, allowed)}; "
                              f"allowed: {', '.join(allowed)}")


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table of field = value")
    return value


def _matches(run: Mapping[str, Any], entry: Mapping[str, tuple]) -> bool:
    return all(run.get(name, DEFAULTS[name]) in values for name, values in entry.items())


def _varying_fields(assignments: Sequence[Mapping[str, Any]]) -> list[str]:
    """The fields whose value differs between runs, in config order."""
    return [name for name in FIELD_NAMES
            if len({repr(run.get(name, DEFAULTS[name])) for run in assignments}) > 1]


def _show_run(values: Mapping[str, Any], names: Sequence[str]) -> str:
    shown = [f"{name}={_show_value(values.get(name, DEFAULTS[name]))}" for name in names]
    return " ".join(shown) or "(the only run)"


def _show_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _show_entry(entry: Mapping[str, tuple]) -> str:
    return "{" + ", ".join(f"{k} = {v[0]!r}" if len(v) == 1 else f"{k} = {list(v)!r}" for k, v in entry.items()) + "}"


# --- re-running: what to do with each run ----------------------------------------------------------
ACTIONS = ("new", "resume", "retry", "skip")


def plan_action(cfg: RunConfig, retry_failed: bool = False) -> str:
    """``new`` (no run folder), ``resume`` (killed or interrupted), ``retry`` (failed, with
    ``retry_failed``) or ``skip`` (completed, diverged, damaged, or failed without ``retry_failed``)."""
    status = run_status(cfg.run_dir)
    if status is None:
        return "new"
    if status in (*runs.FINISHED, runs.DAMAGED):  # a damaged run is named, never trained over
        return "skip"
    if status == "failed":
        return "retry" if retry_failed else "skip"
    if status == "running" and runs.writer_alive(cfg.run_dir):
        return "skip"  # being trained by another process right now
    return "resume"


run_status = runs.run_status


# --- running a grid ----------------------------------------------------------------------------------
def run_grid(configs: Sequence[RunConfig], *, executor: str = "local", workers: int = 1,
             ray_address: str | None = None, retry_failed: bool = False, progress: bool = True,
             stream: TextIO | None = None, nproc_per_run: int = 1) -> pd.DataFrame:
    """Run every config that is not done yet (``plan_action``) and return the grid's table.

    ``executor="local"`` runs ``workers`` runs at a time, each in a worker process with
    ``cpus // workers`` torch threads (unless the config sets ``threads``); ``"ray"`` sends one Ray
    task per run to ``ray_address`` (default: ``$RAY_ADDRESS``, else a Ray started here). With
    ``progress``, one line per run and an ETA go to ``stream`` (default: standard error). With
    ``nproc_per_run`` > 1 each run trains data-parallel on that many processes (torchrun) of one
    machine, or of the one Ray node its task is placed on.

    Returns one row per run, in grid order: the ``dynamics.load_runs`` columns plus ``action``
    (what this sweep did: new, resume, retry, skip) and ``error``. A run that fails, or whose
    worker dies, is recorded ``failed`` with its error and the sweep goes on.
    """
    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor {executor}: must be one of local, ray")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be an integer >= 1")
    if executor == "local" and ray_address:
        raise ConfigError(f"--ray-address {ray_address}: only used with --executor ray")
    if executor == "ray" and workers != 1:
        raise ConfigError(f"--workers {workers}: only used with --executor local; Ray runs as many runs at "
                          "once as the cluster has resources for (set threads in the grid for CPUs per run)")
    if nproc_per_run < 1:
        raise ConfigError(f"--nproc-per-run {nproc_per_run}: must be an integer >= 1")
    for cfg in configs:
        if cfg.batch_size % nproc_per_run:
            raise ConfigError(f"--nproc-per-run {nproc_per_run}: run {cfg.resolved_run_id} has batch_size "
                              f"{cfg.batch_size}, not a multiple of it (each process takes an equal shard)")
    actions = {cfg.resolved_run_id: plan_action(cfg, retry_failed) for cfg in configs}
    board = sweep_board.SweepBoard([(cfg, actions[cfg.resolved_run_id]) for cfg in configs],
                                 (stream or sys.stderr) if progress else None)
    to_run = [cfg for cfg in configs if actions[cfg.resolved_run_id] != "skip"]
    try:
        if executor == "local":
            outcomes = executors.run_local(to_run, workers, board, nproc_per_run)
        else:
            outcomes = executors.run_ray(to_run, ray_address, board, nproc_per_run)
    finally:
        board.close()
    return grid_table(configs, actions, {outcome.run_id: outcome for outcome in outcomes})


def grid_table(configs: Sequence[RunConfig], actions: Mapping[str, str],
               outcomes: Mapping[str, sweep_board.RunOutcome]) -> pd.DataFrame:
    """The ``load_runs`` rows of the grid's runs in grid order, plus ``action`` and ``error``. A
    run without a folder (it failed before training, or never started) gets its settings and the
    status of this sweep's attempt."""
    columns = list(runs.RUN_TABLE_COLUMNS) + ["action", "error"]
    if not configs:
        return pd.DataFrame(columns=columns)
    found = pd.concat([runs.load_runs(root) for root in {cfg.runs_dir for cfg in configs}], ignore_index=True)
    by_path = {Path(row["path"]).resolve(): row for row in found.to_dict("records")}
    rows = []
    for cfg in configs:
        run_id = cfg.resolved_run_id
        outcome = outcomes.get(run_id)
        row = by_path.get(cfg.run_dir.resolve()) or {
            **cfg.to_dict(), "run_id": run_id, "path": str(cfg.run_dir),
            "status": outcome.status if outcome else None}
        if row.get("status") == runs.DAMAGED:
            error = row.get("damage")
        else:
            error = (outcome.error if outcome else None) or runs.read_summary(cfg.run_dir).get("error")
        rows.append({**row, "action": actions[run_id], "error": error})
    frame = pd.DataFrame(rows)
    return frame[[c for c in columns if c in frame] + [c for c in frame if c not in columns]]


def exit_status(table: pd.DataFrame) -> int:
    """0 when every run completed or diverged (or is another process's, which this sweep left to
    it), 130 when the sweep was interrupted, 1 otherwise."""
    errors = table["error"] if "error" in table else pd.Series(None, index=table.index, dtype=object)
    others = errors.map(lambda error: isinstance(error, str) and error.startswith(executors.BUSY)).astype(bool)
    statuses = set(table.loc[~others, "status"])
    if "interrupted" in statuses:
        return 130
    return 0 if statuses <= set(runs.FINISHED) else 1


def describe_plan(grid: Grid, configs: Sequence[RunConfig], retry_failed: bool) -> str:
    """The dry-run listing: one line per run (action, run id, the settings that vary) and a count."""
    swept = _varying_fields([cfg.to_dict() for cfg in configs])
    scale = f" at scale {grid.scale}" if grid.scale else ""
    runs_dir = configs[0].runs_dir if configs else "runs"
    lines = [f"{grid.source}{scale}: {len(configs)} runs in {runs_dir}/"
             + (f" - {grid.description}" if grid.description else "")]
    width = max((len(cfg.resolved_run_id) for cfg in configs), default=0)
    counts: dict[str, int] = {}
    for cfg in configs:
        action = plan_action(cfg, retry_failed)
        status = run_status(cfg.run_dir)
        counts[action] = counts.get(action, 0) + 1
        note = f" ({status})" if action == "skip" else ""
        lines.append(f"  {action + note:<18} {cfg.resolved_run_id:<{width}}  {_show_run(cfg.to_dict(), swept)}")
    lines.append(", ".join(f"{counts[a]} {a}" for a in ACTIONS if a in counts) or "no runs")
    return "\n".join(lines)
