"""The run folder ``runs/<run_id>/``: its layout and write side (``folder``), the parquet logs
(``logs``), checkpoints (``checkpoints``) and reading runs back (``read``). The names below are the
ones the rest of the package and notebooks use as ``runs.<name>``.
"""

from dynamics.runs.checkpoints import (
    DamagedCheckpoint,
    checkpoint_dir,
    checkpoint_steps,
    latest_intact_checkpoint,
    load_trainer_state,
    load_weights,
    read_trainer_state,
    remove_debris,
    save_checkpoint,
    stored_initial_adapter,
)
from dynamics.runs.folder import (
    DAMAGED,
    ENDED,
    FINISHED,
    INITIAL_ADAPTER,
    INITIAL_ADAPTER_KEPT,
    STATUSES,
    ClaimLost,
    RunInUse,
    RunLock,
    RunPlan,
    claim_run,
    config_differences,
    create_run_dir,
    describe_holder,
    git_commit,
    lock_holder,
    now_iso,
    plan_run,
    read_summary,
    stored_config,
    update_summary,
    writer_alive,
)
from dynamics.runs.read import (
    DEFAULT_SETTINGS,
    RUN_TABLE_COLUMNS,
    DamagedRun,
    Run,
    check_run,
    load_metrics,
    load_run,
    load_runs,
    run_status,
)

__all__ = [
    "DAMAGED", "DEFAULT_SETTINGS", "DamagedCheckpoint", "DamagedRun", "ENDED", "FINISHED", "INITIAL_ADAPTER",
    "INITIAL_ADAPTER_KEPT", "RUN_TABLE_COLUMNS",
    "ClaimLost", "Run", "RunInUse", "RunLock", "RunPlan", "STATUSES", "check_run", "checkpoint_dir", "checkpoint_steps",
    "claim_run", "config_differences", "create_run_dir", "describe_holder", "git_commit",
    "latest_intact_checkpoint", "load_metrics", "load_run", "load_runs", "load_trainer_state", "load_weights",
    "lock_holder", "now_iso", "plan_run", "read_summary", "remove_debris", "read_trainer_state", "run_status",
    "save_checkpoint",
    "stored_config", "stored_initial_adapter", "update_summary", "writer_alive",
]
