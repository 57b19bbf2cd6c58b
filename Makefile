# achat: every target sets up what it needs, so `make test` and `make run` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 7777
ARGS   ?=

FUZZ_SECONDS ?= 60
SOAK_SECONDS ?= 60

.PHONY: install run test test-fast lint types check bench soak fuzz clean

# Byte-compiled as pip does for a regular install: with PYTHONDONTWRITEBYTECODE set (as
# here and on CI machines), an editable install's modules would be compiled from source
# at every start, 25-50 ms of `achat join`'s time to its prompt. Only changed files are.
# Best effort: in a checkout it may not write to, everything still runs from source.
install: $(STAMP)
	@$(BIN)/python -m compileall -q src >/dev/null 2>&1 || true

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/achat-server --port $(PORT) $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -m 'not e2e' $(ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

types: install
	$(BIN)/mypy --strict src tests benchmarks

check: lint types test

bench: install
	taskset -c 0 $(BIN)/python benchmarks/host.py --update docs/performance.md
	$(BIN)/python benchmarks/durability.py --update docs/performance.md
	$(BIN)/achat-bench standard --update docs/performance.md
	sleep 5  # let the kernel finish tearing down the sockets of idle (10,000) and ingest
	$(BIN)/python benchmarks/arrival.py --update docs/performance.md
	taskset -c 0 $(BIN)/python benchmarks/say_cost.py --update docs/performance.md
	$(BIN)/python benchmarks/pauses.py --update docs/performance.md
	sleep 5  # let the kernel finish tearing down the load's sockets
	$(BIN)/python benchmarks/client.py --update docs/performance.md
	$(BIN)/python benchmarks/sweep.py --update docs/performance.md --svg docs/busy-room-sweep.svg

# Mixed hostile load against one server (loopback only, bounded); figures into the docs.
soak: install
	$(BIN)/python benchmarks/soak.py --seconds $(SOAK_SECONDS) --update docs/performance.md

# Coverage-guided fuzzing (atheris) of the protocol core, then Hypothesis at 20,000 examples.
fuzz: install
	$(BIN)/python -m pip install --quiet atheris
	mkdir -p .fuzz-corpus && cp fuzz/corpus/* .fuzz-corpus/
	$(BIN)/python fuzz/fuzz_protocol.py -max_total_time=$(FUZZ_SECONDS) .fuzz-corpus
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/protocol -q

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis .fuzz-corpus
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
