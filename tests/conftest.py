"""Shared fixtures: a seeded RNG for every test, tiny configs, and a tiny Llama saved as a local
Hugging Face folder with a character-level tokenizer (for the from_pretrained path)."""

from __future__ import annotations

import os
import tempfile
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub; read by huggingface_hub at import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `datasets` keeps an Arrow copy of every file it reads under its cache: the tests' copies go to a
# folder of their own, not the user's ~/.cache/huggingface
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="dynamics-tests-datasets-"))
# One thread per process: `make test` runs three pytest workers on the 2 cores, and most tests start
# more processes of their own; with torch's default of a thread per core they would be twice
# oversubscribed, and its OpenMP threads spin while they wait. Set before torch is imported, so
# every process the tests start (forked or launched) inherits it; runs that compare bit for bit
# run with the same setting on both sides.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dynamics.config import ConfigWarning  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", ConfigWarning)
        yield


def tiny_config(tmp_path, **overrides) -> dict:
    """Settings of a tiny run: 2-layer random Llama on the synthetic task, a few ms per step."""
    base = dict(model="tiny-llama", task="tiny", method="full", steps=12, batch_size=4, lr=3e-3,
                n_train=64, n_eval=8, n_eval_generate=4, max_new_tokens=8, eval_every=6,
                checkpoint_every=6, layer_metrics_every=3, runs_dir=str(tmp_path / "runs"), progress=False)
    return {**base, **overrides}


@pytest.fixture
def tiny(tmp_path):
    return lambda **overrides: tiny_config(tmp_path, **overrides)


CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def char_tokenizer():
    """A character-level fast tokenizer: ids 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, then characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def local_model_folder(tmp_path_factory):
    """A tiny Llama plus tokenizer saved with save_pretrained: a stand-in for a hub checkout."""
    from dynamics.models import tiny_llama

    folder = tmp_path_factory.mktemp("hf-model")
    model = tiny_llama(seed=0, vocab_size=128)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


# The files that take longest first (measured with --durations=0 on 2 cores): `make test`'s
# workers take a file each as they free up (--dist loadfile), so long files started last would leave
# the other workers waiting on one. Within a file, the order is the file's own.
LONGEST_FIRST = ("test_distributed.py", "test_grid.py", "test_notebooks.py", "test_methods.py", "test_two_writers.py",
                 "test_models.py", "test_hostile_files.py", "test_figures.py", "test_interrupt.py", "test_damaged.py",
                 "test_analyze.py", "test_architecture.py", "test_loraga.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
