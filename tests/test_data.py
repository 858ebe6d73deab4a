import pytest
import torch

from dynamics.config import RunConfig
from dynamics.data import IGNORE_INDEX, gsm, load_task, n_loss_terms, tiny
from tests.conftest import char_tokenizer


def test_tiny_task_is_seeded_and_disjoint():
    cfg = RunConfig(model="tiny-llama", task="tiny", n_train=200, n_eval=50)
    a, b = load_task(cfg), load_task(cfg)
    assert a.train == b.train and a.eval == b.eval
    train_ids = {tuple(ex["input_ids"]) for ex in a.train}
    assert not train_ids & {tuple(ex["input_ids"]) for ex in a.eval}
    assert load_task(RunConfig(model="tiny-llama", task="tiny", n_train=200, n_eval=50, data_seed=1)).train != a.train


def test_tiny_example_counts_up_and_masks_the_prompt():
    example = tiny.make_example(__import__("numpy").random.default_rng(3), seq_len=64)
    prompt, target = example["prompt_ids"], example["input_ids"][len(example["prompt_ids"]):]
    start, length = prompt[1], prompt[2] - tiny.FIRST_CONTENT_ID
    assert target[0] == start and len(target) == length + 1 and target[-1] == tiny.SEP
    assert example["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert example["labels"][len(prompt):] == target


def test_collate_pads_right_and_counts_target_tokens():
    task = load_task(RunConfig(model="tiny-llama", task="tiny", n_train=8, n_eval=2))
    examples = task.train[:3]
    batch = task.collate(examples)
    width = max(len(ex["input_ids"]) for ex in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    assert batch["attention_mask"].sum(1).tolist() == [len(ex["input_ids"]) for ex in examples]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    # loss terms: target tokens that have a predecessor (labels shifted by one)
    expected = sum(sum(label != IGNORE_INDEX for label in ex["labels"][1:]) for ex in examples)
    assert n_loss_terms(batch, "causal_lm") == expected


def test_collate_prompts_pads_left():
    task = load_task(RunConfig(model="tiny-llama", task="tiny", n_train=8, n_eval=2))
    batch = task.collate_prompts(task.train[:2])
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert batch["input_ids"][0, -1].item() == tiny.SEP


def test_collate_prompts_right_aligns_prompts_of_different_lengths():
    task = load_task(RunConfig(model="tiny-llama", task="tiny", n_train=8, n_eval=2))
    examples = [{"prompt_ids": [5, 6, 7]}, {"prompt_ids": [8]}, {"prompt_ids": [9, 10]}]
    batch = task.collate_prompts(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [tiny.PAD, tiny.PAD, 8], [tiny.PAD, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


@pytest.mark.parametrize(("text", "number"), [
    ("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,234", "1234"), ("####-5", "-5"), ("#### 12.0", "12"),
    ("#### 2.5 apples", "2.5"), ("no final answer 42", None),
])
def test_final_number(text, number):
    assert gsm.final_number(text) == number


def test_gsm_encoding_masks_the_question_and_ends_with_eos():
    tokenizer = char_tokenizer()
    example = gsm.encode("What is 2+2?", "2+2=4\n#### 4", tokenizer, seq_len=200)
    n_prompt = len(example["prompt_ids"])
    assert tokenizer.decode(example["prompt_ids"], skip_special_tokens=True) == "Question: What is 2+2?\nAnswer:\n"
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["labels"][n_prompt:-1]) == "2+2=4\n#### 4"
    assert example["answer"] == "4"
    assert gsm.encode("What is 2+2?", "2+2=4\n#### 4", tokenizer, seq_len=10) is None  # no target fits


def test_gsm_splits_are_disjoint_and_independent_of_n_train(local_model_folder):
    from dynamics.models import load_tokenizer

    def build(n_train):
        cfg = RunConfig(model=str(local_model_folder), task="gsm", n_train=n_train, n_eval=20, seq_len=512)
        return load_task(cfg, load_tokenizer(cfg))

    small, large = build(40), build(80)
    assert small.eval == large.eval
    questions = lambda examples: {tuple(ex["prompt_ids"]) for ex in examples}  # noqa: E731
    assert not questions(large.train) & questions(large.eval)
    assert large.train[: len(small.train)] == small.train
    assert all(ex["answer"] is not None for ex in large.eval)


def test_gsm_scoring_reads_the_final_number(local_model_folder):
    from dynamics.models import load_tokenizer

    cfg = RunConfig(model=str(local_model_folder), task="gsm", n_train=4, n_eval=2, seq_len=512)
    tokenizer = load_tokenizer(cfg)
    task = load_task(cfg, tokenizer)
    example = task.eval[0]
    right = tokenizer(f"work...\n#### {example['answer']}", add_special_tokens=False)["input_ids"]
    wrong = tokenizer("work...\n#### 999999", add_special_tokens=False)["input_ids"]
    assert task.score_generation(example, right) and not task.score_generation(example, wrong)


def test_bbc_has_five_classes_and_disjoint_seeded_splits():
    from transformers import AutoTokenizer

    from dynamics.models import minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    cfg = RunConfig(model="minilm-l6", task="bbc", n_eval=100, seq_len=64)
    task = load_task(cfg, tokenizer)
    assert task.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert len(task.train) + len(task.eval) == 2096  # 2,225 files less 129 repeated headlines
    assert len(task.eval) == 100
    assert {ex["label"] for ex in task.eval} == set(range(5))
    assert max(len(ex["input_ids"]) for ex in task.train) == 64
    batch = task.collate(task.train[:4])
    assert batch["labels"].shape == (4,) and batch["labels"].dtype == torch.long
    assert not {tuple(ex["input_ids"]) for ex in task.train} & {tuple(ex["input_ids"]) for ex in task.eval}


def test_bbc_without_an_eval_split():
    from transformers import AutoTokenizer

    from dynamics.models import minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    task = load_task(RunConfig(model="minilm-l6", task="bbc", n_eval=0, n_train=50, seq_len=32), tokenizer)
    assert task.eval == [] and len(task.train) == 50
