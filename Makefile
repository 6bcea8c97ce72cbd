# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
# Each first installs the project into a virtual environment ($(VENV)) when it is missing or pyproject.toml changed;
# when it is up to date the install step is a no-op (a stamp file), so both stay quick to re-run.
#
# torch is pinned: a CPU build ships with the development machines, and an unpinned torch would pull a CUDA build.
# On a GPU machine pass the build you want: `make demo TORCH=torch==2.13.0+cu128` (or install it into $(VENV) first).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.peft_lpi-installed
# Explicit launch settings: `accelerate launch` otherwise warns that they were not passed and guesses them.
LAUNCH ?= --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: install demo test

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/accelerate launch $(LAUNCH) examples/continual_retrieval.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)
