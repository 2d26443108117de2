# kvnode: `make run` starts the agent on embedded defaults, `make test` runs the tests.
# Both create .venv and install what they need on a fresh machine: `run` only the agent
# (kvnode and boto3), `test` also the test tools and vLLM's CPU build.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.kvnode-run
STAMP := $(VENV)/.kvnode-installed
PYTEST_ARGS ?=

.PHONY: run doctor test lint bench demo gpu-check gpu-wheels system-deps clean

$(RUN_STAMP): pyproject.toml Makefile scripts/install.sh
	bash scripts/install.sh "$(PY)" "$(VENV)" run
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml Makefile scripts/install.sh
	bash scripts/install.sh "$(PY)" "$(VENV)" test
	touch $(STAMP) $(RUN_STAMP)

system-deps:
	bash scripts/system-deps.sh

run: $(RUN_STAMP)
	$(BIN)/kvnode agent $(ARGS)

doctor: $(RUN_STAMP)
	$(BIN)/kvnode doctor $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	MYPY=$(BIN)/mypy bash scripts/check-types.sh

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/ipc_bench.py
	@if [ -f benchmarks/tier_bench.py ]; then $(BIN)/python benchmarks/tier_bench.py; fi
	$(BIN)/python benchmarks/peer_bench.py
	@if [ -f benchmarks/vllm_ttft.py ]; then $(BIN)/python benchmarks/vllm_ttft.py; fi

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# On a GPU host with torch and no network: installs nothing from the network, only the
# wheels in .whl/ (fetched beforehand on a networked machine with `make gpu-wheels`).
gpu-check:
	bash scripts/gpu-check.sh

gpu-wheels:
	bash scripts/gpu-wheels.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
