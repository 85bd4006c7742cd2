#!/usr/bin/env bash
# Prints the directory holding the pinned Kubernetes binaries of the local e2e cluster, building them
# once from their Go modules with the machine's Go toolchain (Go module proxy only; no release
# downloads):
#   kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl  k8s.io/kubernetes
#   kubeadm (the kind provider's node image)                                         k8s.io/kubernetes
#   etcd etcdctl                                                                      go.etcd.io/etcd
#   coredns                                                                           github.com/coredns/coredns
# The wrapper modules that pin them (and make k8s.io/kubernetes, whose module zip has no staging/,
# buildable) are tests/e2e/cluster/kube-build/*/go.mod.
#
# Cache: ${CONSUL_REGISTRAR_CACHE:-~/.cache/consul-registrar}/kubernetes/v<version>/bin, keyed by
# the Kubernetes version, with one stamp per component so a bump of etcd or CoreDNS rebuilds only that.
# Go's module and build caches live under the same cache root (go/mod, go/build).
# Everything but the final path goes to stderr. Safe to run concurrently (flock) and idempotent.
set -euo pipefail

KUBERNETES_VERSION="v1.34.4"
ETCD_VERSION="v3.6.16"
COREDNS_VERSION="v1.14.7"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
modules="$here/../tests/e2e/cluster/kube-build"
cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
dest_dir="$cache_root/kubernetes/$KUBERNETES_VERSION"
bin="$dest_dir/bin"

export GOMODCACHE="$cache_root/go/mod"
export GOCACHE="$cache_root/go/build"
export GOTOOLCHAIN=local
export GOFLAGS=-mod=readonly
export CGO_ENABLED=0

log() { printf 'kubernetes.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

kube_bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
stamp_kube="$bin/.kubernetes-$KUBERNETES_VERSION"
stamp_etcd="$bin/.etcd-$ETCD_VERSION"
stamp_coredns="$bin/.coredns-$COREDNS_VERSION"
# kubeadm has its own stamp: caches made before it was added build only it.
stamp_kubeadm="$bin/.kubeadm-$KUBERNETES_VERSION"

complete() { [ -f "$stamp_kube" ] && [ -f "$stamp_kubeadm" ] && [ -f "$stamp_etcd" ] && [ -f "$stamp_coredns" ]; }

# Fast path: a cache hit needs no lock and no Go.
if complete; then
  printf '%s\n' "$bin"
  exit 0
fi

command -v go >/dev/null 2>&1 || die "no Go toolchain on PATH; install Go 1.26+ (https://go.dev/dl) so this script can build Kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION and CoreDNS $COREDNS_VERSION from the Go module proxy"
for m in kubernetes etcd coredns; do
  [ -f "$modules/$m/go.mod" ] || die "wrapper module $modules/$m/go.mod is missing"
done

mkdir -p "$bin" "$GOMODCACHE" "$GOCACHE"
exec 9>"$dest_dir.lock"
if ! flock -n 9; then
  log "another kubernetes.sh is building into $dest_dir; waiting for it"
  flock 9
fi
if complete; then # built while we waited
  printf '%s\n' "$bin"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/kubernetes-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# build MODULE OUTDIR [go build args...]: builds from a copy of the wrapper module (the checkout
# stays untouched; -mod=readonly makes a go.sum that does not match fail instead of drifting).
build() {
  local module=$1 out=$2
  shift 2
  rm -rf "${work:?}/$module"
  cp -R "$modules/$module" "$work/$module"
  (cd "$work/$module" && go mod download >&2 && go build -trimpath -o "$out/" "$@" >&2)
}

# The version stamps of hack/lib/version.sh: unstamped, the API server reports v0.0.0-master and
# helm refuses charts with a kubeVersion constraint. The build date is the release's (from the module
# proxy, downloaded first so it is known on a cold cache), so rebuilds are reproducible; the git
# commit is unknown outside a git checkout and stays empty, as in an archive build.
kube_ldflags() {
  local minor major build_date ldflags pkg
  minor=${KUBERNETES_VERSION#v*.}
  minor=${minor%%.*}
  major=${KUBERNETES_VERSION#v}
  major=${major%%.*}
  (cd "$modules/kubernetes" && go mod download "k8s.io/kubernetes@$KUBERNETES_VERSION") >&2 || true
  build_date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' \
    "$GOMODCACHE/cache/download/k8s.io/kubernetes/@v/$KUBERNETES_VERSION.info" 2>/dev/null || true)
  ldflags="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=archive -X $pkg.buildDate=${build_date:-1970-01-01T00:00:00Z}"
  done
  printf '%s\n' "$ldflags"
}

if [ ! -f "$stamp_kube" ]; then
  ldflags=$(kube_ldflags)
  log "building Kubernetes $KUBERNETES_VERSION (${kube_bins[*]}) from the Go module k8s.io/kubernetes with $(go version | cut -d' ' -f3)"
  log "this takes about 8 minutes of 2 cores, once; it is cached in $bin"
  mkdir -p "$work/kube-out"
  pkgs=()
  for b in "${kube_bins[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  started=$SECONDS
  build kubernetes "$work/kube-out" -ldflags "$ldflags" "${pkgs[@]}" || die "go build of Kubernetes $KUBERNETES_VERSION failed"
  got=$("$work/kube-out/kube-apiserver" --version 2>/dev/null || true)
  [ "$got" = "Kubernetes $KUBERNETES_VERSION" ] || die "built kube-apiserver reports '$got', expected 'Kubernetes $KUBERNETES_VERSION'"
  for b in "${kube_bins[@]}"; do mv -f "$work/kube-out/$b" "$bin/$b"; done
  touch "$stamp_kube"
  log "Kubernetes $KUBERNETES_VERSION built in $((SECONDS - started)) s"
fi

if [ ! -f "$stamp_kubeadm" ]; then
  log "building kubeadm $KUBERNETES_VERSION from the Go module k8s.io/kubernetes (a minute or two)"
  mkdir -p "$work/kubeadm-out"
  build kubernetes "$work/kubeadm-out" -ldflags "$(kube_ldflags)" k8s.io/kubernetes/cmd/kubeadm ||
    die "go build of kubeadm $KUBERNETES_VERSION failed"
  got=$("$work/kubeadm-out/kubeadm" version -o short 2>/dev/null || true)
  [ "$got" = "$KUBERNETES_VERSION" ] || die "built kubeadm reports '$got', expected $KUBERNETES_VERSION"
  mv -f "$work/kubeadm-out/kubeadm" "$bin/kubeadm"
  touch "$stamp_kubeadm"
fi

if [ ! -f "$stamp_etcd" ]; then
  log "building etcd $ETCD_VERSION from the Go module go.etcd.io/etcd/server/v3 (about a minute)"
  mkdir -p "$work/etcd-out"
  build etcd "$work/etcd-out" -ldflags "-s -w" go.etcd.io/etcd/server/v3 go.etcd.io/etcd/etcdctl/v3 \
    || die "go build of etcd $ETCD_VERSION failed"
  # Go names a module's root package binary after the last path element that is not a major version.
  mv -f "$work/etcd-out/server" "$bin/etcd"
  mv -f "$work/etcd-out/etcdctl" "$bin/etcdctl"
  got=$("$bin/etcd" --version 2>&1 || true)
  [[ $got == *"etcd Version: ${ETCD_VERSION#v}"* ]] || die "built etcd reports '$got', expected $ETCD_VERSION"
  touch "$stamp_etcd"
fi

if [ ! -f "$stamp_coredns" ]; then
  log "building CoreDNS $COREDNS_VERSION from the Go module github.com/coredns/coredns (a few minutes)"
  mkdir -p "$work/coredns-out"
  build coredns "$work/coredns-out" -ldflags "-s -w" github.com/coredns/coredns \
    || die "go build of CoreDNS $COREDNS_VERSION failed"
  mv -f "$work/coredns-out/coredns" "$bin/coredns"
  got=$("$bin/coredns" -version 2>&1 || true)
  [[ $got == *"CoreDNS-${COREDNS_VERSION#v}"* ]] || die "built coredns reports '$got', expected $COREDNS_VERSION"
  touch "$stamp_coredns"
fi

log "Kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION and CoreDNS $COREDNS_VERSION cached in $bin"
printf '%s\n' "$bin"
