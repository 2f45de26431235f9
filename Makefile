# Two commands: `make demo` (the example suite: virtio vs emulated devices)
# and `make test` (the project's own tests).  Both set up what is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
JOBS ?= 2

.PHONY: setup image test demo lint unit bench clean

setup:
	@./scripts/setup.sh

image: setup
	$(PY) -m pytest_virtio.images build

lint: setup
	$(VENV)/bin/ruff check pytest_virtio tests benchmarks examples
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: setup
	$(PYTEST) tests/unit tests/plugin -q

test: image lint
	$(PYTEST) -n $(JOBS) tests

DEMO_OUT ?= .pytest-virtio/demo
# Extra pytest arguments, e.g. DEMO_ARGS=--virtio-snapshot (restore, not boot, each guest).
DEMO_ARGS ?=

demo: image
	$(PYTEST) -n auto examples -v \
	    --virtio-plot=$(DEMO_OUT)/chart.png --virtio-json=$(DEMO_OUT)/results.json $(DEMO_ARGS)

bench: image
	$(PY) benchmarks/boot.py

clean:
	rm -rf .pytest-virtio .pytest_cache
