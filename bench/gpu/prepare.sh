#!/usr/bin/env bash
# Fill .gpu/ with what the GPU machine lacks, on a machine that reaches the package registries:
# cp312 x86-64 wheels at uv.lock's versions (sam2, iopath, fvcore and antlr4 built here from their
# sdists) and, with --detectron2-src, your checkout of the detectron2 commit pyproject.toml pins,
# for a CUDA build there. Refuses to finish above 56 MiB; prints what it holds and the total.
#
#   bench/gpu/prepare.sh [--detectron2-src DIR] [--out DIR] [--python-version 3.12]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
# The project's environment builds sam2's wheel against the locked torch (its build imports torch).
make --no-print-directory setup PYTHON="$PYTHON" >/dev/null
export UV="$PYTHON -m uv"
exec .venv/bin/python bench/gpu/bundle.py "$@"
