# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what is needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BACKEND ?= pytorch
DATA_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup data demo test lint benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/constraints.txt requirements/dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -c requirements/constraints.txt -r requirements/dev.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

data:
	@if [ -z "$$MLPUG_FASHION_MNIST_DIR" ] && [ ! -e $(DATA_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
		echo "Installing the Debian package dataset-fashion-mnist"; \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; \
	fi

demo: setup data
	$(PY) examples/fashion_mnist/$(BACKEND)/train.py

test: setup data
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup  # style (ruff) and types (mypy, pinned in requirements/dev.txt, settings in pyproject.toml)
	$(VENV)/bin/ruff check mlpug tests examples benchmarks
	$(VENV)/bin/ruff format --check mlpug tests examples benchmarks
	$(VENV)/bin/mypy

benchmark: setup data  # results go into benchmarks/RESULTS.md by hand, with command and machine
	$(PY) benchmarks/overhead_pytorch.py
	$(PY) benchmarks/overhead_tensorflow.py
	$(PY) benchmarks/step_cost.py
	$(PY) benchmarks/checkpoint.py --backend pytorch
	$(PY) benchmarks/checkpoint.py --backend tensorflow
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/ddp.py
	$(PY) benchmarks/prefetch.py

clean:
	rm -rf $(VENV) .pytest_cache
