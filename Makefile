# Everything runs from the repository's own virtual environment (.venv), created on first use. Two installs, each
# with its stamp: `make run` installs what serving needs (the `serve` extra), `make test` and the tools the dev set.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve
MODEL ?= models/zoo/mnist-fcn-dr
# make run PORT=8080 (unset: --port's default 8000, or SOAP_PORT)
PORT ?=
PYTEST_ARGS ?=

.PHONY: install run wait-ready test lint typecheck bench gpu-check results clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Serving only: no test tools, no training packages.
$(SERVE_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[serve]'
	touch $(SERVE_STAMP)

# The dev set: serving, training, the client, the test tools, ruff and mypy.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	# torchattacks (the `attacks` extra) pins an old `requests` no resolver can satisfy: installed without deps.
	$(PY) -m pip install -q --no-deps torchattacks
	# The peers of benchmarks/peers.py (the `bench` extra, same versions) without PyTriton's numpy<2 pin, which would
	# downgrade the dev set's numpy: PyTriton without dependencies, the others by name, numpy<2 for its stub alone.
	$(PY) -m pip install -q 'litserve>=0.2.19,<0.3' pyzmq sh 'grpcio>=1.64.3' typing_inspect wrapt typer \
		'importlib_metadata>=7.0.1' 'tritonclient[grpc,http]' 'granian>=2.0'
	$(PY) -m pip install -q --no-deps 'nvidia-pytriton==0.7.0'
	$(PY) -m pip install -q --upgrade --target $(VENV)/pytriton-numpy1 'numpy<2'
	touch $(STAMP)

install: $(STAMP)

# Serves in the foreground; it logs "ready: ..." once /readyz answers 200 (models loaded and warmed up).
run: $(SERVE_STAMP)
	$(PY) -m service --model $(MODEL) $(if $(PORT),--port $(PORT))

# Returns once the service on localhost answers /readyz with 200 (e.g. after `make run &`: the first run installs
# for a few minutes, then loads and warms up the model); exit status 1 after WAIT_S seconds. Python's standard
# library only, so it needs no venv.
WAIT_S ?= 900
define WAIT_READY
import sys, time, urllib.request
url, wait_s = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + wait_s
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            if answer.status == 200:
                sys.exit(print("ready:", url))
    except OSError:  # refused while installing or loading, 503 while warming up
        pass
    if time.monotonic() > deadline:
        sys.exit(f"not ready after {wait_s:.0f} s: {url}")
    time.sleep(1)
endef
export WAIT_READY
wait-ready:
	@$(PYTHON) -c "$$WAIT_READY" http://localhost:$(or $(PORT),$(SOAP_PORT),8000)/readyz $(WAIT_S)

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
	$(PY) -m benchmarks.purifier --json benchmarks/results/purifier.json
	$(PY) -m benchmarks.service_load --json benchmarks/results/service_load.json

# The prepared GPU run (benchmarks/gpu_check.py): at most ~8 minutes on one GPU; JSON and a log under OUT.
# `make gpu-check DRY_RUN=1` runs every step on the CPU at tiny sizes (the test suite does this too).
OUT ?= out/gpu-check
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check --out $(OUT) $(if $(DRY_RUN),--dry-run)

# Evaluate the shipped models (long; CPU) and rewrite docs/results.md. Point the roots at your data, e.g.
# make results MNIST_ROOT=DATA CIFAR10_ROOT=DATA
results: $(STAMP)
	$(PY) -m training.results_page --run $(if $(MNIST_ROOT),--mnist-root $(MNIST_ROOT)) \
		$(if $(CIFAR10_ROOT),--cifar10-root $(CIFAR10_ROOT)) --notes docs/results-notes.md

clean:
	rm -rf $(VENV) .pytest_cache
