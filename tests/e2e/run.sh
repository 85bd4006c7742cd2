#!/usr/bin/env bash
# The e2e suite on a real Kubernetes cluster: tests/e2e/run.sh PROVIDER
#
#   local     (make e2e-local) tests/e2e/cluster/local.sh: a single-node Kubernetes built from source,
#             run as local processes (needs root; no Docker);
#   kind      (make e2e, in make test) tests/e2e/kind/cluster.sh: a kind cluster of 1 control plane + 2 workers,
#             made here with nothing pulled (needs root, docker.io and debootstrap from Debian);
#   existing  the cluster KUBECONFIG already names, images already loaded; nothing provisioned.
#
# Steps: provide helm and the Python venv (scripts/check-k8s.sh --tools); build the images
# (scripts/images.sh with buildah; for kind while `up` runs, for local before it);
# `PROVIDER up`, `PROVIDER load` the archives, then the suite (pytest tests/e2e/suite: Consul of
# deploy/consul-dev and the chart, every scenario judged through Consul's HTTP API, printing its
# `FIGURE` lines); ALWAYS `PROVIDER down` at the end (E2E_KEEP_CLUSTER=1 keeps it for a look).
#
# Under CI=true nothing skips: a cluster that cannot be provisioned fails the run with the reason.
# Outside CI, kind without root/dockerd/debootstrap and local without root skip with a message (exit 0).
# Environment: E2E_KEEP_CLUSTER (0), E2E_PYTEST_ARGS (extra pytest arguments, split into words,
# e.g. `-k rollout`), E2E_TESTS (what pytest runs, default tests/e2e/suite; `make soak` names
# tests/e2e/suite/soak.py), E2E_ARTIFACTS (where the suite keeps the rollouts' timelines and pod
# logs; default a new directory under the project's cache, printed at the end),
# E2E_TRAFFIC_SECONDS / E2E_TRAFFIC_RATE (the Go client's traffic during rolling restarts).
# Exported for the suite from the provider's verbs: E2E_KILL_CONTAINER, E2E_STOP_CONTAINER,
# E2E_CONTINUE_CONTAINER and, with several nodes (kind), E2E_KILL_NODE, E2E_PAUSE_NODE,
# E2E_UNPAUSE_NODE, E2E_RESTORE_NODE.
set -euo pipefail
cd "$(dirname "$0")/../.."

provider_name="${1:-}"
case "$provider_name" in
local) provider=tests/e2e/cluster/local.sh ;;
kind) provider=tests/e2e/kind/cluster.sh ;;
existing) provider="" ;;
*)
  echo "usage: tests/e2e/run.sh local|kind|existing" >&2
  exit 2
  ;;
esac

started=$(date +%s)
log() { printf 'e2e: [%4ss] %s\n' "$(($(date +%s) - started))" "$*"; }
fail() {
  printf 'e2e: FAILED: %s\n' "$*" >&2
  exit 1
}
skip() {
  if [ "${CI:-}" = true ]; then
    fail "$* (under CI=true the e2e suite never skips)"
  fi
  echo "e2e/$provider_name: SKIPPED: $*"
  exit 0
}

case "$provider_name" in
kind)
  # A fresh Debian/Ubuntu machine lacks Debian's docker.io (dockerd, containerd, runc) and
  # debootstrap: installed from Debian when we are root with apt-get, as scripts/images.sh does.
  missing=()
  if [ "${KIND_DOCKER:-own}" = own ]; then
    [ "$(id -u)" -eq 0 ] || skip "the kind provider starts its own Docker engine: run as root (or KIND_DOCKER=system)"
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  fi
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing from Debian: ${missing[*]} (once)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } ||
      fail "apt-get install ${missing[*]} failed"
  fi
  if [ "${KIND_DOCKER:-own}" = own ]; then
    command -v dockerd >/dev/null 2>&1 || skip "dockerd not found (apt-get install docker.io)"
  else
    docker info >/dev/null 2>&1 || fail "KIND_DOCKER=system but no Docker engine answers (docker info failed)"
  fi
  command -v debootstrap >/dev/null 2>&1 || skip "debootstrap not found (apt-get install debootstrap): the kind node image is made here"
  ;;
local)
  [ "$(id -u)" -eq 0 ] || skip "the local cluster runs a kubelet and containerd: run as root"
  [ -f "$provider" ] || fail "$provider is missing"
  ;;
existing)
  [ -n "${KUBECONFIG:-}" ] || fail "the existing provider needs KUBECONFIG"
  ;;
esac

# The local cluster's own kubectl (the same version as its API server), when the build script is there.
if [ "$provider_name" != existing ] && [ -f scripts/kubernetes.sh ]; then
  kube_bin=$(bash scripts/kubernetes.sh) || fail "scripts/kubernetes.sh could not provide the Kubernetes binaries"
  export PATH="$kube_bin:$PATH" KUBECTL="$kube_bin/kubectl"
fi

log "providing helm and the Python tools (scripts/check-k8s.sh --tools)"
tools=$(bash scripts/check-k8s.sh --tools) || fail "scripts/check-k8s.sh --tools could not provide helm and pytest"
eval "$tools"
export HELM_BIN PYTHON

cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
export E2E_ARTIFACTS="${E2E_ARTIFACTS:-$cache_root/e2e-artifacts/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$E2E_ARTIFACTS"

cluster_up=0
images_pid=""
finish() {
  local status=$?
  # An image build still running when something failed is stopped.
  if [ -n "$images_pid" ]; then kill "$images_pid" 2>/dev/null || true; fi
  log "artifacts (rollout timelines, pod logs): $E2E_ARTIFACTS"
  if [ "$cluster_up" = 1 ]; then
    if [ "${E2E_KEEP_CLUSTER:-0}" = 1 ]; then
      log "keeping the cluster (E2E_KEEP_CLUSTER=1); remove it with: bash $provider down"
    else
      log "bringing the cluster down ($provider down)"
      bash "$provider" down || status=1
    fi
  fi
  if [ "$status" -eq 0 ]; then log "passed"; else log "FAILED (exit $status)"; fi
  exit "$status"
}
trap finish EXIT

if [ -n "$provider" ]; then
  # kind's `up` mostly waits (the engine, loading the node image, the nodes booting): the images
  # are built meanwhile. The local provider's `up` installs Debian packages, as images.sh may on a
  # fresh machine, and two apt-gets do not run at once: there, one after the other.
  images_list="$E2E_ARTIFACTS/images.list"
  log "building the images"
  bash scripts/images.sh >"$images_list" &
  images_pid=$!
  if [ "$provider_name" = local ]; then
    wait "$images_pid" || fail "scripts/images.sh failed"
    images_pid=""
  fi

  log "bringing the cluster up ($provider up)"
  cluster_up=1 # from here on, `down` runs at the end, even if `up` fails half-way
  bash "$provider" up || fail "$provider up could not provision the cluster (see its messages above)"
  if [ -n "$images_pid" ]; then
    wait "$images_pid" || fail "scripts/images.sh failed"
    images_pid=""
  fi
  mapfile -t archives <"$images_list"
  [ "${#archives[@]}" -gt 0 ] && [ -n "${archives[0]}" ] || fail "no image archive was built"
  log "images: ${archives[*]}"
  env_out=$(bash "$provider" env) || fail "$provider env failed"
  eval "$env_out"
  # E2E_WORKERS: how many workers the provider gives (kind: 2; none said: 1).
  export KUBECONFIG E2E_WORKERS="${E2E_WORKERS:-1}"
  log "loading the images ($provider load)"
  bash "$provider" load "${archives[@]}" || fail "$provider load failed"
  # Kubernetes has no API that kills one container of a running pod: the provider does it (the
  # local provider without that verb: ctr on the node's containerd, in local.sh's work directory).
  if grep -q 'continue-container' "$provider"; then
    export E2E_CONTINUE_CONTAINER="bash $provider continue-container"
  fi
  if grep -q 'stop-container' "$provider"; then
    export E2E_STOP_CONTAINER="bash $provider stop-container"
  fi
  # A node lost, and back (test_nodes.py): providers with several nodes have these verbs.
  for verb in kill-node pause-node unpause-node restore-node; do
    if grep -q "^$verb)" "$provider"; then
      var=$(printf 'E2E_%s' "$verb" | tr 'a-z-' 'A-Z_')
      export "$var=bash $provider $verb"
    fi
  done
  if grep -q 'kill-container' "$provider"; then
    export E2E_KILL_CONTAINER="bash $provider kill-container"
  elif [ "$provider_name" = local ]; then
    sock="${CONSUL_REGISTRAR_E2E_DIR:-/var/lib/consul-registrar-e2e}/run/containerd.sock"
    export E2E_KILL_CONTAINER="ctr --address $sock -n k8s.io task kill -s SIGKILL"
    # The frozen Consul agent of test_hardening.py (item 3): stopped, its sockets still accept.
    export E2E_STOP_CONTAINER="ctr --address $sock -n k8s.io task kill -s SIGSTOP"
    # ...and a node agent stopped for a second, then continued (test_scenarios.py, 6b).
    export E2E_CONTINUE_CONTAINER="ctr --address $sock -n k8s.io task kill -s SIGCONT"
  fi
fi

export PYTHONDONTWRITEBYTECODE=1
log "running the suite against $(kubectl config current-context 2>/dev/null || echo "$KUBECONFIG")"
# shellcheck disable=SC2086 # E2E_TESTS and E2E_PYTEST_ARGS are lists of words
"$PYTHON" -m pytest ${E2E_TESTS:-tests/e2e/suite} -p no:cacheprovider -s -rfEs --durations=0 ${E2E_PYTEST_ARGS:-}
