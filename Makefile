# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what is needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BACKEND ?= pytorch
DATA_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup data demo test lint benchmark package package-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/constraints.txt requirements/dev.txt pyproject.toml
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

package: setup  # the wheel and the sdist, in dist/ (the wheel is built from the sdist)
	rm -rf dist build
	$(PY) -m build --outdir dist .

# The wheel in a clean virtual environment with the pytorch extra, and the Hello World run from outside the source
# tree: a module or data file missing from the package fails here (run by .ci/run).
WHEEL_VENV := .venv-wheel
package-check: package data
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q -c requirements/constraints.txt "$$(ls dist/mlpug-*.whl)[pytorch]"
	cd "$$(mktemp -d)" && cp $(CURDIR)/examples/hello_world/pytorch/train.py hello_world.py && \
	$(CURDIR)/$(WHEEL_VENV)/bin/python -c "import mlpug.pytorch as m; assert '$(WHEEL_VENV)/' in m.__file__, m.__file__" && \
	{ $(CURDIR)/$(WHEEL_VENV)/bin/python hello_world.py > hello_world.log 2>&1 || { cat hello_world.log; exit 1; }; } && \
	tail -n 4 hello_world.log && grep -q "Training completed. All good" hello_world.log && \
	grep -q "predicted label = " hello_world.log && echo "package-check: the wheel's Hello World ran in $$PWD"

clean:
	rm -rf $(VENV) $(WHEEL_VENV) .pytest_cache dist build
