"""Run configuration: one frozen, typed dataclass, validated once at the boundary.

Every field is a CLI flag (``batch_size`` -> ``--batch-size``), a key in a TOML config file and a
grid axis. Values arriving as strings (CLI, grid files) are coerced here, so the CLI, TOML files,
grids and the Python API share one path and one set of one-line error messages::

    --lr abc: must be a positive number
    --method lora+mgpo2: perturbation must be one of ...

Fields whose default is ``None`` are resolved from the task when the config is built (paper
defaults: rho/mu/beta are the NLG values 0.01/0.8/0.8 for generation tasks, the NLU values
0.05/0.9/0.9 for classification), and ``method`` is parsed into ``Method(adapter, perturbation)``
there too: downstream code reads ``cfg.rho`` and ``cfg.adapter`` and never resolves or splits again.
(``dataclasses.replace`` keeps resolved values: change the task by building a new config.)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from dynamics.errors import ConfigError  # noqa: F401  (re-exported: dynamics.config.ConfigError)
from dynamics.files import did_you_mean
from dynamics.user_data import FORMATS, sniff

ADAPTERS = ("full", "lora", "rslora", "dora", "pissa", "loraplus", "adalora", "loraga")
PERTURBATIONS = ("mgpo", "mgpo-noapn", "msam", "sam", "noise")
LORA_FAMILY = ADAPTERS[1:]
# Perturbations defined in the merged weight space of a low-rank adapter (no meaning for ``full``).
WEIGHT_SPACE_PERTURBATIONS = ("mgpo", "mgpo-noapn")
LORAGA_FIELDS = ("loraga_batches", "loraga_direction", "loraga_scale", "loraga_stable_gamma")
# experiment fields newer than the first runs: field -> the value they had (left out of the run id there)
ADDED_LATER = {"autocast": False, "data": None, "data_format": None, "data_config": None, "data_split": None,
               "eval_data": None, "eval_fraction": 0.1, "text_column": "text", "label_column": "label",
               "prompt_column": "prompt", "completion_column": "completion", "messages_column": "messages",
               "answer_column": None, "data_fingerprint": None}
DATA_FORMATS = FORMATS  # the row formats of --data (dynamics.user_data)
BUILTIN_MODELS = ("smollm2-135m", "minilm-l6", "tiny-llama")
TASKS = ("gsm", "bbc", "tiny", "data")  # data: the rows of --data
TASK_KIND = {"gsm": "causal_lm", "tiny": "causal_lm", "bbc": "classification"}
# Model families by what they can do: an encoder has no causal LM head, tiny-llama has no tokenizer.
ENCODER_MODELS = ("minilm-l6",)
TOKENIZER_FREE_MODELS = ("tiny-llama",)

# Paper defaults (Sec. 4, implementation details): NLU (T5-base, GLUE) and NLG (LLaMA-2-7B).
PAPER_DEFAULTS = {
    "classification": {"rho": 0.05, "mu": 0.9, "beta": 0.9},
    "causal_lm": {"rho": 0.01, "mu": 0.8, "beta": 0.8},
}
DEFAULT_N_TRAIN = {"gsm": 2000, "tiny": 2048, "bbc": None, "data": None}  # None: every row not held out


class ConfigWarning(UserWarning):
    """A setting that has no effect under the chosen method, model or task."""


class Method(NamedTuple):
    """``--method ADAPTER[+PERTURBATION]`` parsed: ``lora+mgpo`` -> ``Method("lora", "mgpo")``."""

    adapter: str
    perturbation: str | None


def parse_method(text: str) -> Method:
    """Split and check ``--method``; raises ConfigError naming what is allowed."""
    parts = text.split("+")
    check_value(len(parts) in (1, 2) and all(parts), "method", text, "must be ADAPTER or ADAPTER+PERTURBATION")
    check_value(parts[0] in ADAPTERS, "method", text, "adapter must be one of " + ", ".join(ADAPTERS))
    if len(parts) == 1:
        return Method(parts[0], None)
    check_value(parts[1] in PERTURBATIONS, "method", text, "perturbation must be one of " + ", ".join(PERTURBATIONS))
    if parts[0] == "full" and parts[1] in WEIGHT_SPACE_PERTURBATIONS:
        raise ConfigError(f"--method {text}: adapter full has no low-rank merged weight space for "
                          f"{parts[1]}; use full+msam, full+sam or full+noise, or {parts[1]} with one of "
                          + ", ".join(LORA_FAMILY))
    return Method(parts[0], parts[1])


def _task_defaults(cfg: RunConfig) -> dict[str, Any]:
    """The ``None`` fields of ``cfg`` that the task gives a value (paper defaults, data sizes)."""
    kind = cfg.task_kind
    values = {name: value for name, value in PAPER_DEFAULTS[kind].items() if getattr(cfg, name) is None}
    if cfg.n_train is None and DEFAULT_N_TRAIN[cfg.task] is not None:
        values["n_train"] = DEFAULT_N_TRAIN[cfg.task]
    return values


def config_field(default: Any, help: str, choices: tuple | None = None, control: bool = False,
                 flag: str | None = None, **kw):
    """A dataclass field with CLI metadata (a flag per field: ``dynamics.cli.add_config_flags``).
    ``control`` marks run-control fields (where and how to run) that are not part of the
    experiment: they are left out of the run id and resume checks. ``flag`` names the CLI flag
    when it is not the field's name with dashes."""
    metadata = {"help": help, "choices": choices, "control": control, "flag": flag}  # flag: when not --NAME
    return field(default=default, metadata=metadata, **kw)


_field = config_field  # the short name the field table below reads well with


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one training run. Units: steps are optimizer steps; lr per step."""

    # What to train.
    model: str = _field(
        "smollm2-135m",
        "base model: " + ", ".join(BUILTIN_MODELS) + ", a local folder, or a Hugging Face id org/name",
        BUILTIN_MODELS,
    )
    task: str = _field("gsm", "training task", TASKS)
    method: str = _field(
        "lora", "ADAPTER or ADAPTER+PERTURBATION (see docs/design.md); adapters: " + ", ".join(ADAPTERS)
    )
    rank: int = _field(8, "LoRA rank r (paper default 8)")
    alpha: float = _field(16.0, "LoRA alpha; the update is scaled by alpha/r (paper default 16)")
    lora_dropout: float = _field(0.0, "dropout on the LoRA input, in [0, 1)")
    # Optimisation: AdamW, weight decay 0, cosine schedule, warm-up ratio 0.03 (paper Sec. 4).
    lr: float = _field(2e-4, "peak learning rate")
    steps: int = _field(400, "optimizer steps")
    batch_size: int = _field(8, "examples per micro-batch")
    grad_accum: int = _field(1, "micro-batches per optimizer step")
    seq_len: int = _field(256, "maximum tokens per example (longer ones are truncated)")
    weight_decay: float = _field(0.0, "AdamW decoupled weight decay")
    warmup_ratio: float = _field(0.03, "fraction of steps with linear warm-up, in [0, 1)")
    schedule: str = _field("cosine", "learning-rate schedule after warm-up", ("cosine", "linear", "constant"))
    max_grad_norm: float = _field(1.0, "clip the global gradient norm to this value; 0 turns clipping off")
    seed: int = _field(0, "seed for adapter init, data order and every other draw")
    data_seed: int = _field(0, "seed of the train/eval split and of generated data (kept fixed across seeds)")
    # A researcher's own data (dynamics.data.user_data / formats): trains on it instead of a built-in task.
    data: str | None = _field(None, "your own data: a .jsonl/.json/.csv/.parquet file, a folder of them, a datasets "
                                    "save_to_disk folder, or a hub id (sets --task data)")
    data_format: str | None = _field(None, "row format of --data (default: told from the columns, as TRL names "
                                           "them)", DATA_FORMATS)
    data_config: str | None = _field(None, "configuration of a hub dataset (--data ID)")
    data_split: str | None = _field(None, "split of --data to train on (default: train)")
    eval_data: str | None = _field(None, "held-out data in --data's format (default: its validation/test split, "
                                         "else --eval-fraction of its rows)")
    eval_fraction: float = _field(0.1, "fraction of --data's rows held out (seeded by --data-seed) when it has no "
                                       "eval split and no --eval-data is given")
    text_column: str = _field("text", "--data column with the text (text and classification rows)")
    label_column: str = _field("label", "--data column with the class (classification rows)")
    prompt_column: str = _field("prompt", "--data column with the prompt (prompt/completion rows)")
    completion_column: str = _field("completion", "--data column with the completion (prompt/completion rows)")
    messages_column: str = _field("messages", "--data column with the conversation (messages rows)")
    answer_column: str | None = _field(None, "--data column with a reference answer: exact match by greedy decoding")
    data_fingerprint: str | None = _field(None, "content hash of --data's files (set from them; part of the run id, "
                                                "so an edited file is a new run)")
    # MGPO / perturbation hyper-parameters (None: paper default for the task; see module doc).
    rho: float | None = _field(None, "perturbation radius (default: 0.01 for gsm/tiny, 0.05 for bbc)")
    mu: float | None = _field(None, "AdamW beta1, the momentum MGPO reuses (default: 0.8 for gsm/tiny, 0.9 for bbc)")
    beta: float | None = _field(None, "EMA factor of gradient norms for APN (default: 0.8 for gsm/tiny, 0.9 for bbc)")
    apn_cap: float = _field(10.0, "APN: cap of the scale c = min(1 / g_ema, apn_cap) (reference code: 10)")
    apn_eps: float = _field(1e-12, "APN: epsilon in 1 / (g_ema + eps) and in the direction's normalisation")
    clean_loss_every: int = _field(10, "measure loss_clean (loss at the unperturbed weights) every N steps under "
                                       "mgpo/msam/noise (sam gets it free every step; 0: never)")
    perturb_application: str = _field("auto", "how mgpo applies Delta: dense (rebuilt W0+Delta), lowrank (x V^T U^T "
                                              "term), fused (low-rank, into plain LoRA layers' own matmuls), or auto "
                                              "(folded into plain LoRA layers, cheapest way per layer and pass)",
                                       ("auto", "dense", "lowrank", "fused"))
    loraplus_ratio: float = _field(16.0, "LoRA+: learning rate of B over that of A")
    # LoRA-GA (peft's LoraGAConfig; defaults are peft's): A, B from the SVD of the average gradient
    # of the full weights over the first loraga_batches training batches.
    loraga_batches: int = _field(8, "LoRA-GA: training batches (of batch_size examples, in the run's order) whose "
                                    "average full-weight gradient initialises A and B")
    loraga_direction: str = _field("ArB2r", "LoRA-GA: which singular vectors go to A and B (peft's direction)",
                                   ("ArB2r", "A2rBr", "ArBr", "random"))
    loraga_scale: str = _field("stable", "LoRA-GA: scaling of the initial A, B (peft's scale)",
                               ("stable", "weight_svd", "gd_scale", "unit"))
    loraga_stable_gamma: int = _field(16, "LoRA-GA: gamma of the stable scale (B times out_features^(1/4) / "
                                          "sqrt(gamma))")
    # Data sizes and evaluation.
    n_train: int | None = _field(None, "training examples (default: 2000 for gsm, 2048 for tiny, all for bbc)")
    n_eval: int = _field(64, "held-out examples for the eval loss / accuracy")
    n_eval_generate: int = _field(16, "held-out gsm/tiny problems (the first of the eval set, at most n_eval) "
                                      "scored by greedy decoding (0: off)")
    max_new_tokens: int = _field(256, "generation budget for exact-match evaluation")
    eval_every: int = _field(50, "evaluate every N steps, and at the start and the end (0: start and end only)")
    # Instrumentation and robustness.
    checkpoint_every: int = _field(100, "checkpoint every N steps, and at the end (0: end only)")
    keep_checkpoints: int = _field(3, "checkpoints kept on disk, newest first (0: keep all)")
    layer_metrics_every: int = _field(10, "write per-layer rows to layers.parquet every N steps (0: off)")
    instrument: bool = _field(True, "log norms (grad, param, update, momentum); off only to measure overhead")
    sharpness_every: int = _field(0, "log the Hessian's top eigenvalue(s) to sharpness.parquet every N steps (0: off)")
    sharpness_k: int = _field(1, "how many top Hessian eigenvalues --sharpness-every measures")
    sharpness_batches: int = _field(1, "eval batches (of batch_size examples) in the loss whose Hessian is measured")
    # Numerics and hardware.
    dtype: str = _field("auto", "weight dtype: auto is bf16 on a GPU that supports it, else fp32",
                        ("auto", "fp32", "bf16"))
    device: str = _field("auto", "compute device", ("auto", "cpu", "cuda"))
    attn: str = _field("sdpa", "attention kernel for training and eval (Hessian-vector products switch to eager, "
                       "which has a double backward, while they run)", ("sdpa", "eager"))
    autocast: bool = _field(False, "forward passes in bf16 autocast; weights and optimizer state keep --dtype "
                            "(with --dtype fp32: mixed precision, fp32 trainable weights)")
    gradient_checkpointing: bool = _field(False, "recompute the base model's activations in backward instead of "
                                          "keeping them (less memory, one more forward per step; same numbers)",
                                          control=True)
    threads: int = _field(0, "CPU threads for torch (0: torch's default)", control=True)
    # Run control: where and how, not what (not part of the run id).
    runs_dir: str = _field("runs", "folder that holds run folders", control=True)
    run_id: str | None = _field(None, "run folder name (default: method-rank-lr-seed-hash of the config)", control=True)
    resume: bool = _field(False, "continue the run from its last checkpoint (starts it if it does not exist)",
                          control=True)
    overwrite: bool = _field(False, "replace an existing run folder", control=True)
    progress: bool = _field(True, "show a progress bar", control=True)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce_field(f, getattr(self, f.name)))
        # Parsed and resolved once, here (module doc).
        object.__setattr__(self, "_method", parse_method(self.method))
        if self.data is not None:
            _resolve_data(self)
        _validate(self)
        for name, value in _task_defaults(self).items():
            object.__setattr__(self, name, value)

    # --- derived views -------------------------------------------------------------------
    @property
    def adapter(self) -> str:
        return self._method.adapter

    @property
    def perturbation(self) -> str | None:
        return self._method.perturbation

    @property
    def task_kind(self) -> str:
        if self.task == "data":
            return "classification" if self.data_format == "classification" else "causal_lm"
        return TASK_KIND[self.task]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def experiment_dict(self) -> dict[str, Any]:
        """The fields that define the experiment (run-control fields left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata["control"]}

    def config_hash(self) -> str:
        experiment = self.experiment_dict()
        if self.adapter != "loraga":  # they cannot change such a run: left out, so runs made before they existed
            for name in LORAGA_FIELDS:  # keep their ids
                del experiment[name]
        for name, default in ADDED_LATER.items():  # likewise, while at the value runs had before them
            if experiment[name] == default:
                del experiment[name]
        payload = json.dumps(experiment, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:6]

    def default_run_id(self) -> str:
        """Short, readable and deterministic: ``lora-r8-lr0.0002-s0-1a2b3c``."""
        rank = "" if self.adapter == "full" else f"-r{self.rank}"
        return f"{self.method}{rank}-lr{self.lr:g}-s{self.seed}-{self.config_hash()}"

    @property
    def resolved_run_id(self) -> str:
        return self.run_id or self.default_run_id()

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.resolved_run_id

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> RunConfig:
        """Build from a mapping (TOML table, grid row, JSON). Keys may use dashes or underscores."""
        known = {f.name for f in dataclasses.fields(cls)}
        normalised = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown key '{key}' in {source}{did_you_mean(name, sorted(known))}; "
                                  "see 'dynamics train --help'")
            normalised[name] = value
        return cls(**normalised)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(RunConfig))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_flags(cfg: RunConfig) -> list[str]:
    """``cfg`` as ``dynamics train`` flags that parse back to an equal config (floats by
    ``repr``, which round-trips; unset optional fields left out)."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            out += [flag(f.name), repr(value) if isinstance(value, float) else str(value)]
    return out


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_of(f: dataclasses.Field, cls: type) -> tuple[type, bool]:
    """(base type, optional) of a field of the dataclass ``cls``, from its annotations."""
    hint = _type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def coerce_field(f: dataclasses.Field, value: Any, cls: type | None = None) -> Any:
    """Turn ``value`` (maybe a string from the CLI) into the type of the field ``f`` of the frozen
    config dataclass ``cls`` (default ``RunConfig``), or raise ConfigError naming its flag."""
    base, optional = _type_of(f, cls or RunConfig)
    spelled_none = isinstance(value, str) and (value.lower() in ("none", "null") or (value == "" and base is not str))
    if optional and (value is None or spelled_none):  # an empty --run-id is refused, not the default
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError  # 1.5 is not a rank; 8.0 is
            return int(value)  # inf raises OverflowError, "1.5" ValueError
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError, OverflowError):
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[base]
        raise ConfigError(f"{flag(f.name)} {value!r}: must be {kind}") from None
    raise TypeError(f"unsupported field type {base}")  # pragma: no cover - programming error


def check_value(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{flag(name)} {_shown(value)}: {allowed}")


def _shown(value: Any) -> str:
    """A value as an error message shows it: quoted when it is empty or holds whitespace or control
    characters (``--run-id 'a\\nb'``), so the message stays on one line and says what was given."""
    text = str(value)
    plain = text and text.isprintable() and not any(c.isspace() for c in text)
    return text if plain or not isinstance(value, str) else repr(value)


# A run's folder is staged as ".<run_id>.<8 random characters>" (files.staging_folder_beside): 10
# characters more than the id, within the 255 of a name on Linux and macOS file systems, with room.
MAX_RUN_ID = 200

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _resolve_data(cfg: RunConfig) -> None:
    """``--data``: the task becomes ``data``, its row format is told from the columns and its
    files fingerprinted (``dynamics.data.user_data``), before anything else is checked."""
    if cfg.task not in ("gsm", "data"):  # gsm: the default, left as it is
        raise ConfigError(f"--data {cfg.data}: trains on your data instead of --task {cfg.task}; leave out --task")
    check_value(0 < cfg.eval_fraction < 1, "eval_fraction", cfg.eval_fraction, "must be in (0, 1)")
    object.__setattr__(cfg, "task", "data")
    if cfg.data_format is None or cfg.data_fingerprint is None:  # a stored run's config has both: no file read
        data_format, fingerprint = sniff(cfg)
        object.__setattr__(cfg, "data_format", data_format)
        object.__setattr__(cfg, "data_fingerprint", fingerprint)


def _validate(cfg: RunConfig) -> None:
    check_value(cfg.task in TASKS, "task", cfg.task, "must be one of " + ", ".join(TASKS))
    adapter = cfg.adapter
    if cfg.perturb_application == "fused" and (adapter in ("full", "dora", "adalora") or cfg.lora_dropout > 0):
        raise ConfigError(f"--perturb-application fused: needs plain LoRA layers without dropout (adapter one of lora, "
                          f"rslora, pissa, loraplus, loraga and --lora-dropout 0), got --method {cfg.method} with "
                          f"--lora-dropout {cfg.lora_dropout}; use auto, dense or lowrank")
    model_ok = cfg.model in BUILTIN_MODELS or Path(cfg.model).is_dir() or bool(_HUB_ID.match(cfg.model))
    check_value(model_ok, "model", cfg.model,
           "must be one of " + ", ".join(BUILTIN_MODELS) + ", a local folder, or a Hugging Face id org/name")
    if cfg.model in ENCODER_MODELS and cfg.task_kind == "causal_lm":
        raise ConfigError(f"--model {cfg.model} --task {cfg.task}: an encoder cannot generate; use --task bbc")
    if cfg.model in TOKENIZER_FREE_MODELS and cfg.task != "tiny":
        raise ConfigError(f"--model {cfg.model} --task {cfg.task}: tiny-llama has no tokenizer; use --task tiny")

    check_value(cfg.rank >= 1, "rank", cfg.rank, "must be an integer >= 1")
    check_value(math.isfinite(cfg.alpha) and cfg.alpha > 0, "alpha", cfg.alpha, "must be a positive number")
    check_value(0 <= cfg.lora_dropout < 1, "lora_dropout", cfg.lora_dropout, "must be in [0, 1)")
    check_value(math.isfinite(cfg.lr) and cfg.lr > 0, "lr", cfg.lr, "must be a positive number")
    check_value(cfg.steps >= 1, "steps", cfg.steps, "must be an integer >= 1")
    check_value(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be an integer >= 1")
    check_value(cfg.grad_accum >= 1, "grad_accum", cfg.grad_accum, "must be an integer >= 1")
    check_value(cfg.seq_len >= 8, "seq_len", cfg.seq_len, "must be an integer >= 8")
    check_value(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay,
           "must be a number >= 0")
    check_value(0 <= cfg.warmup_ratio < 1, "warmup_ratio", cfg.warmup_ratio, "must be in [0, 1)")
    check_value(math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0, "max_grad_norm", cfg.max_grad_norm,
           "must be a number >= 0 (0: no clipping)")
    check_value(cfg.seed >= 0, "seed", cfg.seed, "must be an integer >= 0")
    check_value(cfg.data_seed >= 0, "data_seed", cfg.data_seed, "must be an integer >= 0")
    if cfg.rho is not None:
        check_value(math.isfinite(cfg.rho) and cfg.rho >= 0, "rho", cfg.rho, "must be a number >= 0")
    if cfg.mu is not None:
        check_value(0 <= cfg.mu < 1, "mu", cfg.mu, "must be in [0, 1)")
    if cfg.beta is not None:
        check_value(0 <= cfg.beta < 1, "beta", cfg.beta, "must be in [0, 1)")
    check_value(math.isfinite(cfg.apn_cap) and cfg.apn_cap > 0, "apn_cap", cfg.apn_cap, "must be a positive number")
    check_value(math.isfinite(cfg.apn_eps) and cfg.apn_eps > 0, "apn_eps", cfg.apn_eps, "must be a positive number")
    check_value(math.isfinite(cfg.loraplus_ratio) and cfg.loraplus_ratio > 0, "loraplus_ratio", cfg.loraplus_ratio,
           "must be a positive number")
    check_value(cfg.loraga_batches >= 1, "loraga_batches", cfg.loraga_batches, "must be an integer >= 1")
    check_value(cfg.loraga_stable_gamma >= 1, "loraga_stable_gamma", cfg.loraga_stable_gamma, "must be an integer >= 1")
    check_value(cfg.sharpness_k >= 1, "sharpness_k", cfg.sharpness_k, "must be an integer >= 1")
    check_value(cfg.sharpness_batches >= 1, "sharpness_batches", cfg.sharpness_batches, "must be an integer >= 1")
    if cfg.n_train is not None:
        check_value(cfg.n_train >= 1, "n_train", cfg.n_train, "must be an integer >= 1")
    check_value(cfg.n_eval >= 0, "n_eval", cfg.n_eval, "must be an integer >= 0")
    check_value(cfg.n_eval_generate >= 0, "n_eval_generate", cfg.n_eval_generate, "must be an integer >= 0")
    check_value(cfg.max_new_tokens >= 1, "max_new_tokens", cfg.max_new_tokens, "must be an integer >= 1")
    for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "layer_metrics_every", "threads",
                 "clean_loss_every", "sharpness_every"):
        check_value(getattr(cfg, name) >= 0, name, getattr(cfg, name), "must be an integer >= 0")
    for name in ("schedule", "dtype", "device", "attn", "perturb_application", "loraga_direction", "loraga_scale"):
        choices = next(f for f in dataclasses.fields(cfg) if f.name == name).metadata["choices"]
        check_value(getattr(cfg, name) in choices, name, getattr(cfg, name), "must be one of " + ", ".join(choices))
    if cfg.run_id is not None:
        check_value(bool(re.fullmatch(r"[\w.+\-=]+", cfg.run_id)), "run_id", cfg.run_id,
                    "must be a folder name of letters, digits and . _ - + =")
        check_value(not cfg.run_id.startswith("."), "run_id", cfg.run_id,
                    "must not start with '.' (hidden folders are the runs' staging folders; dynamics runs skips them)")
        check_value(len(cfg.run_id) <= MAX_RUN_ID, "run_id", cfg.run_id[:20] + "...",
                    f"has {len(cfg.run_id)} characters; at most {MAX_RUN_ID} (its staging folder's name adds 10 "
                    "to it, and a file system allows 255)")
    check_value(not Path(cfg.runs_dir).exists() or Path(cfg.runs_dir).is_dir(), "runs_dir", cfg.runs_dir,
           "is a file; must be a folder (it is created if missing)")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume --overwrite: choose one (continue the run, or replace it)")


def ineffective_settings(cfg: RunConfig) -> list[str]:
    """Fields set away from their default that have no effect here, as one-line messages."""
    defaults = RunConfig.__dataclass_fields__
    unused: dict[str, str] = {}
    if cfg.adapter == "full":
        for name in ("rank", "alpha", "lora_dropout"):
            unused[name] = f"method {cfg.method}"
    if cfg.perturbation is None:
        for name in ("rho", "beta", "clean_loss_every"):
            unused[name] = f"method {cfg.method} (no perturbation)"
    if cfg.perturbation not in WEIGHT_SPACE_PERTURBATIONS:
        for name in ("apn_cap", "apn_eps", "perturb_application"):
            unused[name] = f"method {cfg.method} (only mgpo and mgpo-noapn use it)"
        if cfg.perturbation is not None:
            unused["beta"] = f"method {cfg.method} (only mgpo and mgpo-noapn use it)"
    if cfg.perturbation == "mgpo-noapn":
        unused["apn_cap"] = "method mgpo-noapn (no APN)"
    if cfg.perturbation == "sam":
        unused["clean_loss_every"] = "method sam (its first pass gives loss_clean every step)"
    if not cfg.sharpness_every:
        for name in ("sharpness_k", "sharpness_batches"):
            unused[name] = "--sharpness-every 0"
    if cfg.adapter != "loraplus":
        unused["loraplus_ratio"] = f"method {cfg.method} (only loraplus uses it)"
    if cfg.adapter != "loraga":
        for name in LORAGA_FIELDS:
            unused[name] = f"method {cfg.method} (only loraga uses it)"
    elif cfg.loraga_scale != "stable":
        unused["loraga_stable_gamma"] = f"--loraga-scale {cfg.loraga_scale} (only stable uses it)"
    if cfg.task_kind == "classification":
        for name in ("n_eval_generate", "max_new_tokens"):
            unused[name] = f"task {cfg.task} (classification)"
    messages = []
    for name, why in unused.items():
        value = getattr(cfg, name)
        if value not in (defaults[name].default, PAPER_DEFAULTS[cfg.task_kind].get(name)):
            messages.append(f"{flag(name)} {value} has no effect under {why}")
    return messages


def warn_ineffective(cfg: RunConfig) -> None:
    for message in ineffective_settings(cfg):
        warnings.warn(message, ConfigWarning, stacklevel=3)


def as_config(config: RunConfig | Mapping[str, Any]) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, Mapping):
        return RunConfig.from_dict(config)
    raise TypeError(f"config must be a RunConfig or a mapping, not {type(config).__name__}")
