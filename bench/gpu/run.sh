#!/usr/bin/env bash
# The GPU kit, one command on the GPU machine (bench/README.md, "GPU kit"):
#
#   bash bench/gpu/run.sh --out "$OUT" --stages 1-5        # then: --stages 6
#   bash bench/gpu/run.sh --cpu-dry-run --out /tmp/kit      # the same stages at CPU sizes, here
#
# On the GPU machine it installs the bundle's wheels (bench/gpu/prepare.sh made them) into a
# private folder, never touching the machine's own torch, and runs the stages with that folder
# and the repository's packages on PYTHONPATH. --cpu-dry-run runs the stages at tiny sizes in the
# project's own environment (.venv) and installs nothing.
#
# Options: --out DIR (default bench/gpu/out), --stages SPEC (default 1-6), --deadline-s SECONDS
# (default 540: every stage fits in what is left, so results come back), --bundle DIR (default
# .gpu), --python PY (default python3), --tiny (CPU sizes with the bundle: a rehearsal).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
mode=gpu bundle="$ROOT/.gpu" python="" kit_args=()
while (($#)); do
  case "$1" in
    --cpu-dry-run) mode=dry ;;
    --tiny) mode=tiny ;;
    --bundle) bundle="$(cd "$2" && pwd)"; shift ;;
    --python) python="$2"; shift ;;
    *) kit_args+=("$1") ;;
  esac
  shift
done
[[ " ${kit_args[*]-} " == *" --out "* ]] || kit_args+=(--out "$ROOT/bench/gpu/out")

if [[ $mode == dry ]]; then
  python="${python:-$ROOT/.venv/bin/python}"
  [[ -x $python ]] || { echo "run.sh: no $python; run 'make setup' first" >&2; exit 2; }
  exec "$python" bench/gpu/kit.py --tiny "${kit_args[@]}"
fi

python="${python:-python3}"
[[ -f $bundle/manifest.json ]] || {
  echo "run.sh: $bundle/manifest.json is missing: run bench/gpu/prepare.sh on a machine with the registries" >&2
  exit 2
}
site="${TMPDIR:-/tmp}/kubetune-gpu-site"
rm -rf "$site"
started=$(date +%s)
"$python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
  --target "$site" "$bundle"/wheels/*.whl
echo "installed $(ls "$bundle"/wheels | wc -l) wheels into $site in $(($(date +%s) - started)) s"
export PYTHONPATH="$site:$ROOT/cli:$ROOT/trainer-image:$ROOT/operator${PYTHONPATH:+:$PYTHONPATH}"
export KUBETUNE_KIT_SITE="$site"
[[ -f $bundle/detectron2-src.tar.gz ]] && export KUBETUNE_KIT_DETECTRON2_SRC="$bundle/detectron2-src.tar.gz"
export PYTHONUNBUFFERED=1
tiny=()
[[ $mode == tiny ]] && tiny=(--tiny)
exec "$python" bench/gpu/kit.py "${tiny[@]}" "${kit_args[@]}"
