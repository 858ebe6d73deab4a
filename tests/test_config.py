import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamics.config import ConfigError, RunConfig, ineffective_settings
from dynamics.files import UnreadableFile, read_toml


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": "nope"}, "--model nope: must be one of smollm2-135m, minilm-l6, tiny-llama"),
        ({"task": "mnist"}, "--task mnist: must be one of gsm, bbc, tiny"),
        ({"method": "lora2"}, "--method lora2: adapter must be one of full, lora"),
        ({"method": "lora+mgpo2"}, "--method lora+mgpo2: perturbation must be one of"),
        ({"method": "lora+a+b"}, "--method lora+a+b: must be ADAPTER or ADAPTER+PERTURBATION"),
        ({"rank": 0}, "--rank 0: must be an integer >= 1"),
        ({"rank": "eight"}, "--rank 'eight': must be an integer"),
        ({"lr": -1}, "--lr -1.0: must be a positive number"),
        ({"lr": "abc"}, "--lr 'abc': must be a number"),
        ({"lr": "nan"}, "--lr nan: must be a positive number"),
        ({"steps": 0}, "--steps 0: must be an integer >= 1"),
        ({"schedule": "step"}, "--schedule step: must be one of cosine, linear, constant"),
        ({"dtype": "fp8"}, "--dtype fp8: must be one of auto, fp32, bf16"),
        ({"mu": 1.0}, "--mu 1.0: must be in [0, 1)"),
        ({"instrument": "maybe"}, "--instrument 'maybe': must be true or false"),
        ({"model": "minilm-l6", "task": "gsm"}, "--model minilm-l6 --task gsm: an encoder cannot generate"),
        ({"model": "tiny-llama", "task": "gsm"}, "tiny-llama has no tokenizer"),
        ({"run_id": "../escape"}, "--run-id ../escape: must be a folder name"),
        ({"run_id": ".hidden"}, "--run-id .hidden: must not start with '.'"),
        ({"run_id": "..hidden"}, "--run-id ..hidden: must not start with '.'"),
        ({"run_id": "x" * 201}, "--run-id xxxxxxxxxxxxxxxxxxxx...: has 201 characters; at most 200"),
        ({"resume": True, "overwrite": True}, "--resume --overwrite: choose one"),
    ],
)
def test_bad_values_raise_one_line_naming_the_field(values, message):
    with pytest.raises(ConfigError) as info:
        RunConfig(**values)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_unknown_key_suggests_the_closest_field():
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' in grid.toml \(did you mean 'lr'\?\)"):
        RunConfig.from_dict({"lrr": 1e-3}, source="grid.toml")


def test_strings_are_coerced_like_cli_values():
    cfg = RunConfig.from_dict({"rank": "16", "lr": "5e-4", "instrument": "false", "rho": "none", "batch-size": "4"})
    assert (cfg.rank, cfg.lr, cfg.instrument, cfg.rho, cfg.batch_size) == (16, 5e-4, False, 0.01, 4)  # none: default


def test_bool_string_false_is_false():
    # argparse's type=bool would make "False" true (a known anti-pattern: bool("False") is True)
    assert RunConfig(instrument="False").instrument is False


def test_paper_defaults_are_resolved_from_the_task_kind():
    gsm = RunConfig(task="gsm")
    bbc = RunConfig(model="minilm-l6", task="bbc")
    assert (gsm.rho, gsm.mu, gsm.beta, gsm.n_train) == (0.01, 0.8, 0.8, 2000)
    assert (bbc.rho, bbc.mu, bbc.beta, bbc.n_train) == (0.05, 0.9, 0.9, None)  # bbc: every article not held out
    assert RunConfig(task="gsm", mu=0.95).mu == 0.95


def test_method_is_parsed_once_into_adapter_and_perturbation():
    assert (RunConfig(method="dora+mgpo-noapn").adapter, RunConfig(method="dora+mgpo-noapn").perturbation) == (
        "dora", "mgpo-noapn")
    assert RunConfig(method="full").perturbation is None
    with pytest.raises(ConfigError, match=r"--method lora\+mgpo2: perturbation must be one of mgpo, mgpo-noapn"):
        RunConfig(method="lora+mgpo2")


def test_run_id_is_deterministic_readable_and_ignores_run_control():
    a = RunConfig(method="lora", rank=64, lr=5e-4, seed=1)
    b = RunConfig(method="lora", rank=64, lr=5e-4, seed=1, runs_dir="elsewhere", progress=False)
    assert a.default_run_id() == b.default_run_id()
    assert a.default_run_id().startswith("lora-r64-lr0.0005-s1-")
    assert RunConfig(method="lora", rank=64, lr=5e-4, seed=1, steps=10).default_run_id() != a.default_run_id()
    # an explicit default and the resolved default name the same experiment
    assert RunConfig(mu=0.8).default_run_id() == RunConfig().default_run_id()


def test_settings_without_effect_are_reported():
    messages = ineffective_settings(RunConfig(method="full", rank=64, rho=0.05))
    assert any(m.startswith("--rank 64 has no effect under method full") for m in messages)
    assert any(m.startswith("--rho 0.05 has no effect") for m in messages)
    assert ineffective_settings(RunConfig()) == []
    stored = RunConfig.from_dict(RunConfig().to_dict())  # a stored config holds the resolved defaults
    assert ineffective_settings(stored) == []


def test_toml_round_trip(tmp_path):
    cfg = RunConfig(method="full", lr=1e-5, steps=7, rho=0.02, run_id="x")
    text = "\n".join(f"{k} = {v!r}".replace("True", "true").replace("False", "false")
                     for k, v in cfg.to_dict().items() if v is not None)
    path = tmp_path / "run.toml"
    path.write_text(text.replace("'", '"'))
    assert RunConfig.from_dict(read_toml(path)) == cfg
    assert RunConfig.from_dict({**read_toml(path), "steps": "9"}).steps == 9


def test_bad_toml_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("lr = = 3")
    with pytest.raises(UnreadableFile, match="not valid TOML"):
        read_toml(path)
    with pytest.raises(UnreadableFile, match="no such file"):
        read_toml(tmp_path / "missing.toml")


int_fields = st.sampled_from(["rank", "steps", "batch_size", "grad_accum", "seed", "eval_every"])


@settings(max_examples=50, deadline=None)
@given(name=int_fields, value=st.integers(min_value=1, max_value=10_000))
def test_valid_ints_round_trip_through_strings(name, value):
    cfg = RunConfig.from_dict({name: str(value)})
    assert getattr(cfg, name) == value
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@settings(max_examples=50, deadline=None)
@given(lr=st.floats(min_value=1e-8, max_value=10, allow_nan=False), rho=st.floats(0, 1, allow_nan=False))
def test_a_config_round_trips_through_config_json_with_the_same_run_id(lr, rho):
    cfg = RunConfig(method="lora+mgpo", lr=lr, rho=rho)
    stored = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # what config.json holds
    assert stored == cfg and stored.default_run_id() == cfg.default_run_id()


def test_replace_validates_again():
    with pytest.raises(ConfigError, match=r"^--lr -1.0: must be a positive number$"):
        dataclasses.replace(RunConfig(), lr=-1.0)
    with pytest.raises(ConfigError, match="--rank 1.5: must be an integer"):
        dataclasses.replace(RunConfig(), rank=1.5)
