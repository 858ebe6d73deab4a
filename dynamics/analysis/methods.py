"""Which runs compare: method names as the run table spells them, their order, and the one
setting per task at which several methods ran (:func:`comparable_runs`).

Pure: frames in, frames out. Labels and colours are the figures' business (``dynamics.figures``);
this module only knows the names in ``runs["method"]``, including figure variants
``method[knob=value,...]`` (``dynamics.figures.method_variants``).
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

# The order methods are listed in, in tables and figures; others follow, alphabetically.
METHOD_ORDER = ("lora", "lora+mgpo", "lora+mgpo-noapn", "lora+msam", "lora+sam", "lora+noise", "full")


def base_method(method: str) -> str:
    """The method a variant is of: ``lora+mgpo[apn_cap=1]`` -> ``lora+mgpo``."""
    return method.partition("[")[0]


def method_sort_key(method: str) -> tuple[int, str]:
    """Sort key in ``METHOD_ORDER``, a variant right after its method."""
    base = base_method(method)
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def comparable_runs(runs: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """The runs of ``methods`` at one shared setting per task: per task, the (model, lr, steps,
    rank, alpha) with the most of ``methods`` (ties: the most runs); full fine-tuning matches on
    model, lr and steps only (its rank setting means nothing)."""
    runs = runs[runs["method"].map(base_method).isin(methods)]  # variants included
    keys = [k for k in ("model", "lr", "steps") if k in runs]
    chosen = []
    for _, of_task in runs.groupby("task"):
        candidates = []
        for _, group in of_task.groupby(keys, dropna=False):
            full, adapters = group[group["method"] == "full"], group[group["method"] != "full"]
            for _, at_rank in adapters.groupby(["rank", "alpha"]):
                frame = pd.concat([full, at_rank])
                candidates.append(((frame["method"].nunique(), len(frame)), frame))
        if candidates:
            chosen.append(max(candidates, key=lambda item: item[0])[1])
    return pd.concat(chosen, ignore_index=True) if chosen else runs.iloc[:0]
