# Two commands do all setup on a fresh machine with Python 3.11:
#   make demo   — a complete small SAM2 fine-tune (synthetic data, local S3, CPU or GPU)
#   make test   — the test suite
# Both install uv (from PyPI) if needed and create .venv from uv.lock.

PYTHON ?= python3
UV := $(PYTHON) -m uv
PYTEST_ARGS ?=

.PHONY: setup system-deps controlplane demo test test-fast lint lock detectron2

# Debian's prometheus (2.42) for the monitoring tests and chromium for the report page's browser
# test; installed when missing and we are root (CI, fresh machines). Without them those tests are
# skipped and say so.
SYSTEM_PACKAGES := prometheus chromium
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "note:$$missing not installed; the tests that need them will be skipped"; fi; fi

# --inexact keeps what you added yourself, e.g. detectron2 from `make detectron2`.
setup:
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv>=0.8"
	$(UV) sync --frozen --inexact --extra dev

# detectron2 is not on PyPI: this builds it from upstream's git source at the commit uv.lock pins
# (needs GitHub access and a C++ compiler; a few minutes). Its tests are skipped without it.
detectron2: setup
	$(UV) sync --frozen --inexact --extra dev --extra detectron2

# The real Kubernetes control plane the operator and chart tests run against, built from its Go
# modules (tests/controlplane/go.mod) into .controlplane/ (ignored); reused while go.sum is unchanged.
# The first build, downloads included, took 7 min 15 s on a 2-core machine (2026-11-27).
controlplane:
	bash tests/controlplane/build.sh

demo: setup
	$(UV) run --frozen kubetune demo

# The import contracts (pyproject.toml, [tool.importlinter]) first: a broken layer fails fast.
test: setup system-deps controlplane
	$(UV) run --frozen lint-imports --no-cache
	$(UV) run --frozen pytest $(PYTEST_ARGS)

test-fast: setup
	$(UV) run --frozen lint-imports --no-cache
	$(UV) run --frozen pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(UV) run --frozen ruff check .
	$(UV) run --frozen lint-imports --no-cache

lock:
	$(UV) lock
