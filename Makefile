# Everything a fresh machine needs: `make demo` (a small real run) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/cifar100
# the demo's table goes under runs/ (ignored by git); `make demo OUT=results/demo` refreshes the committed one
OUT ?= runs/demo/table
# torch is pinned first: an unpinned requirement would pull a multi-GB CUDA build on a CPU machine.
TORCH ?= torch==2.13.0

.PHONY: install test demo quick lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts

demo: install
	$(VENV)/bin/vaqkd table --preset demo --data-root $(DATA) --out $(OUT)

quick: install
	$(VENV)/bin/vaqkd table --preset quick --seeds 1 --data-root $(DATA)

bench: install
	$(VENV)/bin/vaqkd bench --json --force --out results/bench/cpu.json

clean:
	rm -rf $(VENV) runs .pytest_cache
