"""``dynamics export RUN --out DIR [--step N]``: a run's checkpoint as a standard peft LoRA
adapter folder for the ORIGINAL base model, loadable by ``PeftModel.from_pretrained(base, DIR)``.

- ``lora``, ``rslora``, ``dora``, ``loraplus``, ``adalora``: the checkpoint's adapter already
  applies to the original base; it is written as peft saves it.
- ``pissa``, ``loraga``: these train against an offset base W0' = W0 - s B0 A0. peft's
  ``save_pretrained(path_initial_model_for_weight_conversion=...)`` rewrites the trained (A, B) as
  a rank-2r LoRA on W0 (``subtract_mutated_init``), ``s B A - s B0 A0 = s [B, -B0] [A; A0]``,
  from the run's ``initial_adapter/`` (A0, B0). A pissa run made before runs kept that folder gets
  it re-derived (PiSSA's start is a deterministic SVD of W0).
- ``full``: refused (the checkpoint's ``model.safetensors`` is the whole model already).

The folder is written beside ``--out`` and renamed into place: it is whole or absent, and an
existing ``--out`` is never replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

from dynamics import runs
from dynamics.adapters import save_initial
from dynamics.config import ConfigError
from dynamics.data import load_task
from dynamics.files import staging_folder_beside, write_json
from dynamics.models import build_model, load_tokenizer


def export_adapter(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write checkpoint ``step`` (default: the newest intact one) of the run at ``run_dir`` to the
    new folder ``out`` as a LoRA adapter of the original base model; returns ``out``.
    Raises ConfigError (one line) for a full fine-tuning run, a missing step, or an existing ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.json)")
    try:
        runs.check_run(run_dir)
        cfg = runs.stored_config(run_dir)
    except runs.DamagedRun as error:
        raise ConfigError(str(error)) from None
    if cfg.adapter == "full":
        raise ConfigError(f"{run_dir.name}: --method {cfg.method} trains the whole model, there is no adapter to "
                          f"export; its checkpoints' model.safetensors is the model")
    _check_out(out)
    try:
        with runs.RunLock(run_dir, purpose="export"):  # no trainer prunes the checkpoint while it is read
            return _export_locked(run_dir, cfg, out, step)
    except runs.RunInUse as error:
        raise ConfigError(f"{error}; export it when that process ends") from None


def _check_out(out: Path) -> None:
    """``--out`` must be a new folder whose nearest existing ancestor is a folder: one line otherwise."""
    if os.path.lexists(out):  # a dangling symlink too: never followed, never replaced
        raise ConfigError(f"--out {out}: exists; choose a new folder (an export never replaces one)")
    ancestor = out.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():  # a file, or a symlink to nothing
        raise ConfigError(f"--out {out}: {ancestor} is not a folder; choose a folder path")


def _export_locked(run_dir: Path, cfg, out: Path, step: int | None) -> Path:
    """The export, with the run's lock held (``export_adapter``)."""
    if step is None:
        step, _, damaged = runs.latest_intact_checkpoint(run_dir)
        if step is None:
            why = f" ({damaged[0]})" if damaged else ""
            raise ConfigError(f"{run_dir.name}: no intact checkpoint to export{why}")
    elif step not in runs.checkpoint_steps(run_dir):
        have = ", ".join(map(str, runs.checkpoint_steps(run_dir))) or "none"
        raise ConfigError(f"--step {step}: {run_dir.name} has no such checkpoint; its checkpoints: {have}")
    else:
        try:
            runs.read_trainer_state(run_dir, step)
        except runs.DamagedCheckpoint as error:
            raise ConfigError(f"{run_dir.name}: {error}") from None
    try:
        loraga = runs.stored_initial_adapter(run_dir, cfg)
    except runs.DamagedCheckpoint as error:
        raise ConfigError(f"{run_dir.name}: {error}") from None

    task = load_task(cfg, load_tokenizer(cfg))
    num_labels = len(task.label_names) or None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder_beside(out)
    try:
        with tempfile.TemporaryDirectory(dir=staging) as scratch:
            initial = None
            if cfg.adapter in runs.INITIAL_ADAPTER_KEPT:
                # peft rewrites the initial adapter's config while converting: it gets a copy
                initial = Path(scratch) / runs.INITIAL_ADAPTER
                if (run_dir / runs.INITIAL_ADAPTER).exists():
                    shutil.copytree(run_dir / runs.INITIAL_ADAPTER, initial)
                else:  # pissa only (loraga's is required above): its start is W0's SVD, re-derived
                    save_initial(build_model(cfg, num_labels=num_labels), initial)
            model = build_model(cfg, num_labels=num_labels, loraga=loraga)
            runs.load_weights(model, runs.checkpoint_dir(run_dir, step))
            with warnings.catch_warnings():  # peft's advice to convert PiSSA to plain LoRA: what this does
                warnings.filterwarnings("ignore", "PiSSA changes the base weights")
                model.save_pretrained(staging / "adapter", path_initial_model_for_weight_conversion=
                                      None if initial is None else str(initial))
        for path in (staging / "adapter").iterdir():
            path.rename(staging / path.name)
        (staging / "adapter").rmdir()
        write_json(staging / "export.json", {"run_id": run_dir.name, "step": step, "method": cfg.method,
                                             "base_model": cfg.model,
                                             "converted_to_original_base": initial is not None})
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
