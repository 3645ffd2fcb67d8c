# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean-scratch

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-scratch:
	rm -rf .featcache/scratch

# Benchmarks (numbers, not tests): results in benchmarks/results*.json and .md
.PHONY: bench-quick bench bench-gpu
# BEFORE=<a git worktree of an older commit>: its host cost is measured in the same run
bench-quick: $(STAMP)
	cd benchmarks && ../$(BIN)/python run.py --quick $(if $(BEFORE),--before $(BEFORE))

bench: $(STAMP)
	cd benchmarks && ../$(BIN)/python run.py $(if $(BEFORE),--before $(BEFORE))

bench-gpu: $(STAMP)
	cd benchmarks && ../$(BIN)/python run.py --gpu
