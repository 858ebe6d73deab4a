"""``runs/<run_id>/checkpoints/step_N/``: trainable weights as safetensors (the adapter in peft's
layout, or the whole model for ``full``) and ``trainer_state.pt`` (progress, optimizer, scheduler,
RNG, perturbation and adapter state). Each checkpoint is staged beside its final name and renamed
into place, so a folder named ``step_N`` is always complete.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from dynamics.files import as_os_error, first_line, named_as_target, replace_folder, staging_folder_beside
from dynamics.runs.folder import INITIAL_ADAPTER

CHECKPOINT_PREFIX = "step_"


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.exists():
        return []
    steps = []
    for path in folder.iterdir():
        match = re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", path.name)
        if match and (path / "trainer_state.pt").exists():
            steps.append(int(match.group(1)))
    return sorted(steps)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"


def save_checkpoint(run_dir: Path, step: int, model, trainer_state: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step_N`` (weights as safetensors + ``trainer_state.pt``) atomically,
    then drop all but the newest ``keep`` checkpoints (``keep=0`` keeps all)."""
    import torch  # lazy, like every torch import under runs/: reading runs must stay torch-free

    target = checkpoint_dir(run_dir, step)
    target.parent.mkdir(exist_ok=True)
    staging = staging_folder_beside(target)
    try:
        save_weights(model, staging)
        torch.save(trainer_state, staging / "trainer_state.pt")
    except Exception as error:  # a full disk: said as the OS error it is, and no half checkpoint left
        fault = named_as_target(as_os_error(error, staging) or error, staging, target)
        shutil.rmtree(staging, ignore_errors=True)
        if fault is not error:
            raise fault from error
        raise
    if target.exists():  # the same step saved again (a resumed run): never a moment without it
        replace_folder(staging, target)
    else:
        staging.rename(target)
    if keep > 0:
        for old in checkpoint_steps(run_dir)[:-keep]:
            shutil.rmtree(checkpoint_dir(run_dir, old), ignore_errors=True)
    return target


def save_weights(model, folder: Path) -> None:
    """Trainable weights only: the adapter (peft layout, loadable by ``PeftModel.from_pretrained``)
    or, for full fine-tuning, the whole model (shared tensors such as tied embeddings saved once)."""
    from safetensors.torch import save_model  # lazy: see save_checkpoint

    if hasattr(model, "peft_config"):
        config = model.peft_config[model.active_adapter]
        rank_pattern = getattr(config, "rank_pattern", None)
        # AdaLoRA: peft saves weights cut down to its rank pattern; keep them full size (pruned ranks
        # are zeroed in E) so a resume continues the very tensors the optimizer state belongs to,
        # and PeftModel.from_pretrained still loads them. The pattern is in trainer_state.pt.
        if rank_pattern:
            config.rank_pattern = None
        try:
            model.save_pretrained(folder)
        finally:
            if rank_pattern:
                config.rank_pattern = rank_pattern
    else:
        save_model(model, str(folder / "model.safetensors"))


def load_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file, load_model  # lazy: see save_checkpoint

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict  # lazy: see save_checkpoint

        result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint {folder} has unexpected adapter keys: {result.unexpected_keys[:3]}")
    else:
        load_model(model, str(folder / "model.safetensors"))


def stored_initial_adapter(run_dir: Path, cfg):
    """What rebuilds a ``loraga`` run's model as it was at step 0 (a ``LoraGASource`` naming
    ``initial_adapter/``), None for other adapters. Raises DamagedCheckpoint when the folder is
    missing or does not read: without it the offset base W0' cannot be rebuilt."""
    if cfg.adapter != "loraga":
        return None
    from safetensors.torch import load_file  # lazy, like every torch import under runs/

    from dynamics.adapters import LoraGASource  # lazy: adapters import torch

    folder = Path(run_dir) / INITIAL_ADAPTER
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise DamagedCheckpoint(f"{INITIAL_ADAPTER}/ (LoRA-GA's step-0 adapter) is missing")
    try:
        load_file(str(weights))
    except Exception as error:
        raise DamagedCheckpoint(f"{INITIAL_ADAPTER}/ (LoRA-GA's step-0 adapter) is damaged "
                                f"({type(error).__name__}: {first_line(error)})") from None
    return LoraGASource(initial_adapter=folder)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    import torch  # lazy: see save_checkpoint

    return torch.load(folder / "trainer_state.pt", weights_only=True)



class DamagedCheckpoint(ValueError):
    """A checkpoint folder whose files cannot be read in full; the message is one line."""


def read_trainer_state(run_dir: Path, step: int) -> dict[str, Any]:
    """``trainer_state.pt`` of ``checkpoints/step_N``, after checking that every file of the
    checkpoint reads in full (so a resume never starts from a half-read state); raises
    ``DamagedCheckpoint``."""
    from safetensors.torch import load_file  # lazy: see save_checkpoint

    folder = checkpoint_dir(run_dir, step)
    weights = [folder / name for name in ("adapter_model.safetensors", "model.safetensors") if (folder / name).exists()]
    try:
        if not weights:
            raise FileNotFoundError("no weights file")
        for path in weights:
            load_file(str(path))
        state = load_trainer_state(folder)
        if not isinstance(state, dict) or "progress" not in state:
            raise ValueError("trainer_state.pt holds no progress")
    except Exception as error:  # truncated, corrupt, wrong format: each is the same answer
        raise DamagedCheckpoint(f"checkpoint step {step} is damaged ({type(error).__name__}: "
                                f"{first_line(error)})") from None
    return state


# What a killed writer can leave behind: files.write_atomic's temporary files
# (".NAME.PID.TOKEN.tmp"), files.staging_folder_beside's folders (".NAME.XXXXXXXX") and
# files.replace_folder's set-aside ones (".NAME.replaced-PID-TOKEN").
_TEMPORARY_FILE = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")
_STAGING_FOLDER = re.compile(r"\..+\.([a-z0-9_]{8}|replaced-\d+-[0-9a-f]{8})")


def remove_debris(run_dir: Path, resumed_step: int) -> list[str]:
    """Remove what a killed writer left in its run folder, once a resume has loaded an intact state
    at ``resumed_step`` (0: from the start): temporary files of atomic writes, staging folders, and
    checkpoint folders past that step (torn or damaged; the run writes them again when it gets
    there). The caller holds the run's lock, so no other writer's file is here. A symlink is
    removed as a link, never followed. Returns the removed paths, relative to ``run_dir``."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in os.scandir(folder):
            step = re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", entry.name) if folder != run_dir else None
            debris = (_TEMPORARY_FILE.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False)) or \
                _STAGING_FOLDER.fullmatch(entry.name) or (step and int(step.group(1)) > resumed_step)
            if not debris:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(str(Path(entry.path).relative_to(run_dir)))
    return sorted(removed)


def latest_intact_checkpoint(run_dir: Path) -> tuple[int | None, dict[str, Any] | None, list[str]]:
    """``(step, trainer_state, damaged)`` of the newest checkpoint that reads in full, newest first;
    ``damaged`` has one line per newer checkpoint that did not (``(None, None, damaged)`` when
    none is intact)."""
    damaged = []
    for step in reversed(checkpoint_steps(run_dir)):
        try:
            return step, read_trainer_state(run_dir, step), damaged
        except DamagedCheckpoint as error:
            damaged.append(str(error))
    return None, None, damaged
