# Two commands do all setup on a fresh machine with Python 3.11:
#   make demo   — a complete small SAM2 fine-tune (synthetic data, local S3, CPU or GPU)
#   make test   — the test suite
# Both install uv (from PyPI) if needed and create .venv from uv.lock.

PYTHON ?= python3
UV := $(PYTHON) -m uv
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint lock

setup:
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv>=0.8"
	$(UV) sync --frozen --extra dev

demo: setup
	$(UV) run --frozen kubetune demo

test: setup
	$(UV) run --frozen pytest $(PYTEST_ARGS)

test-fast: setup
	$(UV) run --frozen pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(UV) run --frozen ruff check .

lock:
	$(UV) lock
