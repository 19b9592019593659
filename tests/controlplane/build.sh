#!/usr/bin/env bash
# Builds the control plane the tests run against from the Go modules pinned in go.mod/go.sum:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok and helm, into
# .controlplane/bin (ignored). A build is reused while its stamp (the Go version and go.sum's
# hash) matches, so only the first run on a machine pays for it.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${KUBETUNE_CONTROLPLANE_DIR:-$ROOT/.controlplane}"
BIN="$OUT/bin"
command -v go >/dev/null || { echo "build.sh: no Go toolchain on PATH (needed to build the test control plane)" >&2; exit 2; }
stamp="$(go env GOVERSION) $(sha256sum "$HERE/go.sum" | cut -c1-16)"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)
whole=1
for binary in "${BINARIES[@]}"; do [[ -x $BIN/$binary ]] || whole=0; done
if ((whole)) && [[ -f $OUT/stamp && "$(cat "$OUT/stamp")" == "$stamp" ]]; then
  exit 0
fi
version="$(cd "$HERE" && GOFLAGS=-mod=readonly go list -m -f '{{.Version}}' k8s.io/kubernetes)"
[[ $version =~ ^v([0-9]+)\.([0-9]+)\. ]] || { echo "build.sh: no k8s.io/kubernetes version in go.mod" >&2; exit 2; }
ldflags="-s -w"
# What Kubernetes' own build stamps in (hack/lib/version.sh): without it the API server calls
# itself v0.0.0 and its compatibility version is wrong.
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=${BASH_REMATCH[1]} -X $pkg.gitMinor=${BASH_REMATCH[2]}"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
mkdir -p "$BIN"
started=$(date +%s)
cd "$HERE"
echo "building the test control plane (Kubernetes $version) into $BIN; the first build takes minutes" >&2
GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$BIN/" \
  ./etcd \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl \
  sigs.k8s.io/kwok/cmd/kwok \
  helm.sh/helm/v4/cmd/helm
echo "$stamp" >"$OUT/stamp"
echo "built the test control plane in $(($(date +%s) - started)) s" >&2
