# bnnctl: `make run` sets up and runs the main job; `make test` sets up and runs the tests.
# Both work on a fresh CPU-only machine (no GPU, no downloads beyond the package registries).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine install your torch build into the venv first (README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test test-fast bench clean browser postgres gpu-check docs docs-serve

setup: $(VENV)/.bnnctl-installed

$(VENV)/.bnnctl-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(VENV)/bin/bnnctl study run studies/quickstart.yaml

# The dashboard's browser tests drive Debian's headless Chromium through chromedriver: installed
# here when missing (as root or with sudo); without them those tests skip (and fail under CI=true).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    ( $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null ) \
	    || echo "warning: could not install chromium + chromium-driver; the browser tests will skip"; \
	fi

# The state-store tests run against a private PostgreSQL server too (Debian's postgresql, started by
# the tests on a free port as the postgres user): installed here when missing; without it they skip.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    ( $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null ) \
	    || echo "warning: could not install postgresql; the PostgreSQL tests will skip"; \
	fi

test: setup browser postgres
	$(PY) -m pytest -q

# Everything not marked slow (a real browser, drivers killed, > ~5 s) or cluster (several Ray nodes or
# processes): the inner loop while editing; `make test` (and CI) runs them all.
test-fast: setup postgres
	$(PY) -m pytest -q -m "not slow and not cluster"

# The documentation site (docs/, mkdocs.yml): built with every link and reference checked; the
# test suite builds it too (tests/test_docs.py).
docs: setup
	$(VENV)/bin/mkdocs build --strict

docs-serve: setup
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

bench: setup
	$(PY) tests/benchmarks/bench_binary_vs_real.py

# The GPU check, in one command, on a machine with a CUDA GPU whose python has torch and CuPy (nothing
# else: no Ray, MLflow, Optuna, ... and no network): the CuPy kernels' tests against the float
# emulation, then their timings against cuDNN FP16/BF16.
gpu-check:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_kernels.py -k gpu
	$(PYTHON) tests/benchmarks/bench_xnor_conv.py --gpu-only

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache
