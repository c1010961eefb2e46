# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what is needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# make demo BACKEND=pytorch|tensorflow|jax: the Fashion-MNIST example of that backend
BACKEND ?= pytorch
BACKENDS := pytorch tensorflow jax
DATA_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup data check-backend demo test lint benchmark package package-check clean benchmark-peers docs

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

check-backend:
	@case " $(BACKENDS) " in *" $(BACKEND) "*) ;; \
		*) echo "BACKEND=$(BACKEND) is not a backend; choose one of: $(BACKENDS)" >&2; exit 2;; esac

demo: check-backend setup data
	$(PY) examples/fashion_mnist/$(BACKEND)/train.py

test: setup data
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup  # style (ruff) and types (mypy, pinned in requirements/dev.txt, settings in pyproject.toml)
	$(VENV)/bin/ruff check mlpug tests examples benchmarks
	$(VENV)/bin/ruff format --check mlpug tests examples benchmarks
	$(VENV)/bin/mypy

benchmark: setup data  # results go into benchmarks/RESULTS.md by hand, with command and machine
	$(PY) benchmarks/overhead_pytorch.py
	$(PY) benchmarks/fast_path_pytorch.py
	$(PY) benchmarks/overhead_tensorflow.py
	$(PY) benchmarks/step_overhead_tensorflow.py
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
	$(PY) tests/wheel_check.py files "$$(ls dist/mlpug-*.whl)"
	$(WHEEL_VENV)/bin/pip install -q -c requirements/constraints.txt "$$(ls dist/mlpug-*.whl)[pytorch]"
	cd "$$(mktemp -d)" && cp $(CURDIR)/examples/hello_world/pytorch/train.py hello_world.py && \
	cp $(CURDIR)/tests/wheel_check.py . && $(CURDIR)/$(WHEEL_VENV)/bin/python wheel_check.py run && \
	$(CURDIR)/$(WHEEL_VENV)/bin/python -c "import mlpug.pytorch as m; assert '$(WHEEL_VENV)/' in m.__file__, m.__file__" && \
	{ $(CURDIR)/$(WHEEL_VENV)/bin/python hello_world.py > hello_world.log 2>&1 || { cat hello_world.log; exit 1; }; } && \
	tail -n 4 hello_world.log && grep -q "Training completed. All good" hello_world.log && \
	grep -q "predicted label = " hello_world.log && echo "package-check: the wheel's Hello World ran in $$PWD"

clean:
	rm -rf $(VENV) $(WHEEL_VENV) .pytest_cache dist build

# mlpug beside Lightning, Ignite, accelerate, pytorch-accelerated and Keras 3 (issue 13): the peers are not
# dependencies of mlpug, so they get their own venv; torch stays pinned by requirements/constraints.txt.
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_ROUNDS ?= 10

$(PEERS_VENV)/.installed: requirements/constraints.txt requirements/dev.txt benchmarks/peers/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -c requirements/constraints.txt -r requirements/dev.txt -r benchmarks/peers/requirements.txt
	$(PEERS_PY) -m pip install --no-deps -e .
	touch $@

benchmark-peers: $(PEERS_VENV)/.installed data  # writes benchmarks/peers/results.md and results.json
	$(PEERS_PY) benchmarks/peers/run.py --rounds $(PEERS_ROUNDS)

# The user guide (mkdocs + mkdocstrings, settings in mkdocs.yml) into site/, warnings as errors; every python block
# of its pages runs in tests/docs/test_snippets.py. NO_MKDOCS_2_WARNING silences mkdocs-material's banner.
docs: setup
	$(PY) -m pip install -c requirements/constraints.txt -r requirements/docs.txt
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
