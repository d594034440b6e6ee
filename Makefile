# make serve [ARGS="--port 9000 --devices cpu:4"]
# make test  [PYTEST_ARGS="tests/test_config.py -x"]
# make bench (bench/serving_core.sh, bench/fault_tolerance.sh, bench/peer_restart.sh; results in docs/bench/)
# Each creates or reuses .venv and install into it first (quick when nothing changed).

PYTHON ?= python3
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.kevlard-installed

.PHONY: install serve test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	VENV="$(VENV)" PYTHON="$(PYTHON)" scripts/install.sh

serve: $(STAMP)
	$(VENV)/bin/kevlard serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	bash bench/serving_core.sh
	bash bench/fault_tolerance.sh
	bash bench/peer_restart.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
