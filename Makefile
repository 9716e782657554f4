# Everything runs from the repository's own virtual environment (.venv), created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= models/zoo/mnist-fcn-dr
PYTEST_ARGS ?=

.PHONY: install run test lint typecheck bench gpu-check results clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# torchattacks (the `attacks` extra) pins an old `requests` no resolver can satisfy: installed without deps.
	$(PY) -m pip install -q --no-deps torchattacks
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m service --model $(MODEL)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The rules and the formatting live in pyproject.toml ([tool.ruff]), the import contract (models/ imports neither
# training/ nor service/, service/ not training/, no import cycle) in .importlinter; .pre-commit-config.yaml runs the
# same checks.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# mypy: strict on models/ and service/, checked on training/ ([tool.mypy] in pyproject.toml says what and why).
typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/purifier.py --json benchmarks/results/purifier.json
	$(PY) benchmarks/service_load.py --json benchmarks/results/service_load.json

# The prepared GPU run (benchmarks/gpu_check.py): at most ~8 minutes on one GPU; JSON and a log under OUT.
# `make gpu-check DRY_RUN=1` runs every step on the CPU at tiny sizes (the test suite does this too).
OUT ?= out/gpu-check
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out $(OUT) $(if $(DRY_RUN),--dry-run)

# Evaluate the shipped models (long; CPU) and rewrite docs/results.md. Point the roots at your data, e.g.
# make results MNIST_ROOT=../shared/data CIFAR10_ROOT=../shared/data/cifar10-jpeg
results: $(STAMP)
	$(PY) -m training.results_page --run $(if $(MNIST_ROOT),--mnist-root $(MNIST_ROOT)) \
		$(if $(CIFAR10_ROOT),--cifar10-root $(CIFAR10_ROOT)) --notes docs/results-notes.md

clean:
	rm -rf $(VENV) .pytest_cache
