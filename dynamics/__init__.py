"""dynamics: instrumented LoRA / LoRA-MGPO fine-tuning for studying training dynamics.

Public API (docs/design.md): ``train(config) -> Run``, ``load_run(path) -> Run``,
``load_runs(root) -> DataFrame``, ``RunConfig``; analysis lives in ``dynamics.analysis``.
Heavy imports (torch, transformers) happen on first use, so ``import dynamics`` is quick.
"""

__version__ = "0.1.0"

__all__ = ["RunConfig", "ConfigError", "train", "load_run", "load_runs", "__version__"]


def __getattr__(name):
    # Every import here is lazy: `import dynamics` must not import torch, pandas or scipy.
    if name in ("RunConfig", "ConfigError"):
        from dynamics import config  # lazy: see above

        return getattr(config, name)
    if name == "train":
        # lazy: torch, transformers and peft load here
        from dynamics.training import train

        return train
    if name in ("load_run", "load_runs", "Run"):
        # lazy: pandas and scipy load here
        from dynamics import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'dynamics' has no attribute {name!r}")
