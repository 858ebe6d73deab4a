"""LoRA-GA through peft (issue 16): the start keeps the function, the offset base never moves and is
rebuilt bit for bit (resume, analyze), the gradient comes from the run's own first batches, and a
checkpoint exports to a plain LoRA adapter of the original base model."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_expected

import dynamics
from dynamics import runs
from dynamics.adapters import LoraGASource, save_initial
from dynamics.cli import main
from dynamics.config import ConfigError, RunConfig
from dynamics.data import load_task
from dynamics.models import build_model, tiny_llama
from dynamics.training.data_order import DataOrder
from dynamics.training.setup import GradientEstimate
from dynamics.training.step import TrainState, train_step

SETTINGS = dict(lr=3e-2, steps=12, batch_size=8, n_train=128, n_eval=8, n_eval_generate=0, eval_every=0,
                checkpoint_every=4, keep_checkpoints=0, loraga_batches=4)


def settings(tiny, method, **overrides):
    return tiny(**{**SETTINGS, "method": method, "run_id": method, **overrides})


def fresh_loraga(cfg: RunConfig):
    task = load_task(cfg)
    estimate = GradientEstimate(task, cfg, torch.device("cpu"))
    return build_model(cfg, loraga=LoraGASource(gradient_step=estimate)), task, estimate


def frozen(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def test_the_start_keeps_the_function_and_the_first_loss_equals_loras(tiny):
    lora = dynamics.train(settings(tiny, "lora"))
    loraga = dynamics.train(settings(tiny, "loraga"))
    # step 1's loss is taken at the initial weights, on the same first batch
    assert_expected(loraga.metrics["loss"].iloc[0], lora.metrics["loss"].iloc[0], rtol=1e-6, atol=1e-12)
    assert_expected(loraga.evals["loss"].iloc[0], lora.evals["loss"].iloc[0], rtol=1e-6, atol=1e-12)  # step-0 eval
    with pytest.raises(AssertionError):  # then they part (by numpy allclose's default tolerances)
        assert_expected(loraga.metrics["loss"].iloc[2:], lora.metrics["loss"].iloc[2:], rtol=1e-5, atol=1e-8)

    cfg = RunConfig(**settings(tiny, "loraga"))
    model, _, _ = fresh_loraga(cfg)
    x = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        assert_expected(model(input_ids=x).logits, tiny_llama(0)(input_ids=x).logits, rtol=0, atol=1e-5)
    products = [m.lora_B["default"].weight @ m.lora_A["default"].weight for m in model.modules()
                if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(products) == 14 and all(p.abs().max() > 1e-4 for p in products)  # not LoRA's B = 0


def test_the_gradient_comes_from_the_runs_first_batches(tiny):
    """A0's rows span the top right singular vectors of the mean gradient of W0 over the first
    loraga_batches batches of the run's data order (peft's ArB2r direction)."""
    cfg = RunConfig(**settings(tiny, "loraga", loraga_batches=3, rank=2))
    model, task, estimate = fresh_loraga(cfg)
    assert estimate.seconds > 0

    base = tiny_llama(0)
    order = DataOrder(len(task.train), cfg.seed)
    for k in range(3):
        batch = task.collate([task.train[i] for i in order.indices(8 * k, 8)])
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        torch.nn.functional.cross_entropy(logits.reshape(-1, 128), targets.reshape(-1), ignore_index=-100).backward()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    gradient = base.model.layers[0].self_attn.q_proj.weight.grad / 3
    _, _, vh = torch.linalg.svd(gradient)
    overlap = torch.linalg.svdvals(q_proj.lora_A["default"].weight @ vh[:2].T)  # cosines of principal angles
    assert overlap.min() > 0.99, overlap


@pytest.mark.parametrize("method", ["loraga+mgpo", "loraga+sam", "loraga+noise", "loraga+msam"])
def test_the_offset_base_stays_bit_identical_and_is_rebuilt_bit_for_bit(tiny, method):
    cfg = RunConfig(**settings(tiny, method, rho=0.5))
    model, task, _ = fresh_loraga(cfg)
    after_offset = frozen(model)
    state = TrainState.create(cfg, model)
    order = DataOrder(len(task.train), cfg.seed)
    for step in range(1, 13):
        result = train_step(state, order.micro_batches(task, 8 * (step - 1), cfg, torch.device("cpu")), step)
        assert result.applied
    assert result.row["perturb_norm"] > 0
    for name, weight in frozen(model).items():
        assert torch.equal(weight, after_offset[name]), name

    # What a resume, analyze or export does: the stored step-0 adapter re-derives W0' exactly.
    fresh, _, _ = fresh_loraga(cfg)
    folder = cfg.run_dir / "initial"

    save_initial(fresh, folder)
    rebuilt = build_model(cfg, loraga=LoraGASource(initial_adapter=folder))
    for name, weight in frozen(rebuilt).items():
        assert torch.equal(weight, after_offset[name]), name
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config.get("lora_ga_config") is None


@pytest.mark.parametrize("method", ["loraga", "loraga+mgpo"])
def test_a_killed_run_resumes_to_the_same_losses(tiny, tmp_path, method):
    reference = dynamics.train(settings(tiny, method))
    crashed_settings = {**settings(tiny, method), "runs_dir": str(tmp_path / "crashed")}
    crashed = dynamics.train(crashed_settings)
    for step in runs.checkpoint_steps(crashed.path):
        if step > 4:
            shutil.rmtree(runs.checkpoint_dir(crashed.path, step))
    runs.update_summary(crashed.path, status="failed")
    resumed = dynamics.train({**crashed_settings, "resume": True})
    columns = ["step", "loss", "loss_clean", "grad_norm", "perturb_norm", "grad_ema", "apn_scale"]
    pd.testing.assert_frame_equal(resumed.metrics[columns], reference.metrics[columns], check_exact=True)
    np.testing.assert_array_equal(resumed.evals["loss"], reference.evals["loss"])


@pytest.mark.parametrize("damage", ["missing", "cut off"])
def test_a_run_without_its_initial_adapter_is_named_in_one_line(tiny, capsys, damage):
    run = dynamics.train(settings(tiny, "loraga", steps=24))  # analyze's phases need > 21 steps
    weights = run.path / runs.INITIAL_ADAPTER / "adapter_model.safetensors"
    if damage == "missing":
        shutil.rmtree(weights.parent)
        what = "is missing"
    else:
        weights.write_bytes(weights.read_bytes()[:200])
        what = "is damaged (SafetensorError: "
    runs.update_summary(run.path, status="failed")
    with pytest.raises(ConfigError, match=rf"--resume loraga: initial_adapter/ \(LoRA-GA's step-0 adapter\) "
                                          rf"{re.escape(what)}.*; start the run again with --overwrite"):
        dynamics.train({**settings(tiny, "loraga", steps=24), "resume": True})
    assert main(["analyze", str(run.path), "--max-iter", "2"]) == 1  # named, not measured on the wrong base
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"loraga: damaged: initial_adapter/ (LoRA-GA's step-0 adapter) {what}")
    assert not (run.path / "phases.parquet").exists()


def test_loraga_mgpo_trains_and_records_its_set_up_cost(tiny):
    run = dynamics.train(settings(tiny, "loraga+mgpo", steps=40, rho=0.05))
    assert run.summary["status"] == "completed"
    loss = run.metrics["loss"]
    assert loss.tail(5).mean() < 0.9 * loss.head(5).mean()
    assert (run.metrics["perturb_norm"].iloc[1:] > 0).all()
    runtime = run.info["runtime"]
    assert runtime["loraga_gradient_s"] > 0 and runtime["loraga_svd_s"] > 0
    assert run.summary["adapter_init_s"] == runtime["adapter_init_s"]
    assert_expected(runtime["adapter_init_s"], runtime["loraga_gradient_s"] + runtime["loraga_svd_s"],
                    rtol=0, atol=2e-3)
    table = dynamics.load_runs(run.path.parent).set_index("run_id")
    assert table.loc["loraga+mgpo", "adapter_init_s"] == run.summary["adapter_init_s"]


def test_analyze_measures_the_trained_model_not_one_without_the_offset(tiny):
    from dynamics.run_analysis import measure_at_checkpoint

    run = dynamics.train(settings(tiny, "loraga", eval_every=12))
    cfg = runs.stored_config(run.path)
    model = build_model(cfg, loraga=runs.stored_initial_adapter(run.path, cfg))
    runs.load_weights(model, runs.checkpoint_dir(run.path, 12))
    from dynamics.training.evaluate import evaluate

    assert evaluate(model, load_task(cfg), cfg, torch.device("cpu"))["loss"] == run.evals["loss"].iloc[-1]
    rows = measure_at_checkpoint(run, 12, {"sharpness": dict(k=1, tol=1e-3, max_iter=5)})["sharpness"]
    assert rows and np.isfinite(rows[0]["eigenvalue"])


@pytest.mark.parametrize("method", ["loraga", "pissa", "lora+mgpo"])
def test_an_export_applies_to_the_original_base_model(tiny, tmp_path, method, capsys):
    from peft import PeftModel

    run = dynamics.train(settings(tiny, method))
    out = tmp_path / "export" / method
    assert main(["export", str(run.path), "--out", str(out), "--step", "8"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg = runs.stored_config(run.path)
    trained = build_model(cfg, loraga=runs.stored_initial_adapter(run.path, cfg))
    runs.load_weights(trained, runs.checkpoint_dir(run.path, 8))
    exported = PeftModel.from_pretrained(tiny_llama(0), out)  # the ORIGINAL random base, W0
    x = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        theirs, ours, untouched = (m(input_ids=x).logits for m in (exported, trained, tiny_llama(0)))
    assert_expected(theirs, ours, rtol=0, atol=1e-4)
    assert (ours - untouched).abs().max() > 0.1  # the adapter does something
    converted = method != "lora+mgpo"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == (16 if converted else 8)
    assert json.loads((out / "export.json").read_text())["converted_to_original_base"] is converted
    assert (run.path / runs.INITIAL_ADAPTER).exists() == converted
    if converted:  # peft rewrites the initial adapter's config while converting: ours was left alone
        assert json.loads((run.path / runs.INITIAL_ADAPTER / "adapter_config.json").read_text())["r"] == 8


def test_export_refuses_in_one_line_and_writes_nothing(tiny, tmp_path, capsys):
    full = dynamics.train(settings(tiny, "full", lr=3e-3))
    lora = dynamics.train(settings(tiny, "loraga"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = [
        ([str(lora.path), "--out", str(tmp_path / "a-file" / "out")], f"--out {tmp_path / 'a-file' / 'out'}: "
                                                                      f"{tmp_path / 'a-file'} is not a folder"),
        ([str(lora.path), "--out", str(tmp_path / "dangling")], f"--out {tmp_path / 'dangling'}: exists"),
        ([str(lora.path), "--out", str(tmp_path / "dangling" / "out")], "is not a folder"),
        ([str(full.path), "--out", str(tmp_path / "a")], "full: --method full trains the whole model, there is "
                                                          "no adapter to export"),
        ([str(lora.path), "--out", str(tmp_path / "taken")], f"--out {tmp_path / 'taken'}: exists; choose a new "
                                                             "folder"),
        ([str(lora.path), "--out", str(tmp_path / "b"), "--step", "5"], "--step 5: loraga has no such checkpoint; "
                                                                        "its checkpoints: 4, 8, 12"),
        ([str(tmp_path), "--out", str(tmp_path / "c")], "not a run folder (no config.json)"),
    ]
    for argv, message in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "dangling", "runs", "taken"]
    assert list((tmp_path / "taken").iterdir()) == [] and not (tmp_path / "nowhere").exists()
    with runs.RunLock(lora.path):  # as while a trainer holds the run (and may prune the checkpoint read)
        assert main(["export", str(lora.path), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the run is in use by another process" in err[0] and "export it when" in err[0], err
    assert not (tmp_path / "d").exists()


def test_a_quantised_base_is_refused_in_one_line(tiny, monkeypatch, capsys):
    import dynamics.models

    def quantised(cfg, num_labels=None, dtype=torch.float32):
        model = tiny_llama(cfg.seed)
        model.model.layers[0].self_attn.q_proj.quant_state = object()  # what bitsandbytes' 4-bit layers carry
        return model

    monkeypatch.setattr(dynamics.models, "load_base_model", quantised)
    argv = ["train", *[f"--{k.replace('_', '-')}={v}" for k, v in settings(tiny, "loraga").items()
                       if not isinstance(v, bool)], "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynamics train: --method loraga: ") and "quantized" in err[0], err
    runs_dir = __import__("pathlib").Path(settings(tiny, "loraga")["runs_dir"])
    assert not runs_dir.exists() or not any(runs_dir.iterdir())  # nothing written


def test_the_classification_model_starts_from_its_gradient_too(tmp_path):
    common = dict(model="minilm-l6", task="bbc", rank=4, alpha=8, lr=1e-3, steps=2, batch_size=4, seq_len=64,
                  n_train=24, n_eval=8, eval_every=0, loraga_batches=2, runs_dir=str(tmp_path), progress=False)
    lora = dynamics.train({**common, "method": "lora"})
    loraga = dynamics.train({**common, "method": "loraga+mgpo"})
    assert loraga.summary["status"] == "completed"
    assert_expected(loraga.metrics["loss"].iloc[0], lora.metrics["loss"].iloc[0], rtol=1e-5, atol=1e-12)
    assert_expected(loraga.evals["loss"].iloc[0], lora.evals["loss"].iloc[0], rtol=1e-5, atol=1e-12)
    assert (loraga.path / runs.INITIAL_ADAPTER / "adapter_model.safetensors").exists()


def test_loraga_settings_leave_other_runs_ids_alone():
    # the id of a lora run as before the loraga_* fields existed (commit 869c0db)
    assert RunConfig(method="lora").default_run_id() == "lora-r8-lr0.0002-s0-de8ae1"
    assert RunConfig(method="lora").config_hash() == RunConfig(method="lora", loraga_batches=3).config_hash()
    assert RunConfig(method="loraga").config_hash() != RunConfig(method="loraga", loraga_batches=3).config_hash()
    with pytest.raises(ConfigError, match="--loraga-direction AB: must be one of ArB2r, A2rBr, ArBr, random"):
        RunConfig(method="loraga", loraga_direction="AB")
