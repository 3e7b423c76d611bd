# Everything a user or CI needs; `make test` and `make run` set up the environment themselves.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU build of torch; a GPU user runs `make install TORCH_SPEC="torch==2.13.0 --index-url ..."`
# or installs their CUDA torch into .venv before `make install` (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test test-slow lint bench bench-smoke clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m stm_dlp.run

test: $(STAMP)
	$(BIN)/ruff check stm_dlp experiments tests
	WANDB_MODE=offline $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check stm_dlp experiments tests

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
