# make serve [ARGS="--port 9000 --devices cpu:4"]
# make test  [PYTEST_ARGS="tests/test_config.py -x"]
# make bench (bench/*.sh and bench/scaling.py; results in docs/bench/, then docs/BENCHMARKS.md written from them)
# Each creates or reuses .venv and install into it first (quick when nothing changed).

PYTHON ?= python3
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.kevlard-installed

.PHONY: install serve test bench bench-report clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	VENV="$(VENV)" PYTHON="$(PYTHON)" scripts/install.sh

serve: $(STAMP)
	$(VENV)/bin/kevlard serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	git describe --always --dirty > docs/bench/.code && mv docs/bench/.code docs/bench/code.txt  # the code measured
	bash bench/serving_core.sh
	bash bench/fault_tolerance.sh
	bash bench/emulated_restart.sh
	bash bench/peer_restart.sh
	$(VENV)/bin/python bench/scaling.py
	$(MAKE) bench-report

# docs/BENCHMARKS.md again from the results in docs/bench/, without running anything
bench-report: $(STAMP)
	$(VENV)/bin/python -m kevlard.bench.document docs/bench docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
