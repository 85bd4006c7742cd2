#!/usr/bin/env bash
# The e2e suite on a real Kubernetes cluster: tests/e2e/run.sh PROVIDER
#
#   local     (make e2e) tests/e2e/cluster/local.sh: a single-node Kubernetes built from source,
#             run as local processes (needs root; no Docker);
#   kind      (make e2e-kind) tests/e2e/kind/cluster.sh: a kind cluster (needs docker and kind);
#   existing  the cluster KUBECONFIG already names, images already loaded; nothing provisioned.
#
# Steps: provide helm and the Python venv (scripts/check-k8s.sh --tools); build the images
# (scripts/images.sh with buildah, or for kind without buildah `cluster.sh images` with docker);
# `PROVIDER up`, `PROVIDER load` the archives, then the suite (pytest tests/e2e/suite: Consul of
# deploy/consul-dev and the chart, every scenario judged through Consul's HTTP API, printing its
# `FIGURE` lines); ALWAYS `PROVIDER down` at the end (E2E_KEEP_CLUSTER=1 keeps it for a look).
#
# Under CI=true nothing skips: a cluster that cannot be provisioned fails the run with the reason.
# Outside CI, kind without docker/kind and local without root skip with a message (exit 0).
# Environment: E2E_KEEP_CLUSTER (0), E2E_PYTEST_ARGS (extra pytest arguments, e.g. `-k rollout`),
# E2E_TRAFFIC_SECONDS / E2E_TRAFFIC_RATE (the Go client's traffic during rolling restarts).
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
  for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null 2>&1 || skip "$tool not found on PATH (the kind provider needs docker, kind and kubectl)"
  done
  docker info >/dev/null 2>&1 || fail "docker is installed but no Docker engine answers (docker info failed)"
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
if [ "$provider_name" = local ] && [ -f scripts/kubernetes.sh ]; then
  kube_bin=$(bash scripts/kubernetes.sh) || fail "scripts/kubernetes.sh could not provide the Kubernetes binaries"
  export PATH="$kube_bin:$PATH" KUBECTL="$kube_bin/kubectl"
fi

log "providing helm and the Python tools (scripts/check-k8s.sh --tools)"
tools=$(bash scripts/check-k8s.sh --tools) || fail "scripts/check-k8s.sh --tools could not provide helm and pytest"
eval "$tools"
export HELM_BIN PYTHON

cluster_up=0
finish() {
  local status=$?
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
  log "building the images"
  if [ "$provider_name" = kind ] && ! command -v buildah >/dev/null 2>&1; then
    archives_out=$(bash "$provider" images) || fail "building the images with docker failed"
  else
    archives_out=$(bash scripts/images.sh) || fail "scripts/images.sh failed"
  fi
  mapfile -t archives <<<"$archives_out"
  [ "${#archives[@]}" -gt 0 ] && [ -n "${archives[0]}" ] || fail "no image archive was built"
  log "images: ${archives[*]}"

  log "bringing the cluster up ($provider up)"
  cluster_up=1 # from here on, `down` runs at the end, even if `up` fails half-way
  bash "$provider" up || fail "$provider up could not provision the cluster (see its messages above)"
  env_out=$(bash "$provider" env) || fail "$provider env failed"
  eval "$env_out"
  export KUBECONFIG
  log "loading the images ($provider load)"
  bash "$provider" load "${archives[@]}" || fail "$provider load failed"
  # Kubernetes has no API that kills one container of a running pod: the provider does it (the
  # local provider without that verb: ctr on the node's containerd, in local.sh's work directory).
  if grep -q 'kill-container' "$provider"; then
    export E2E_KILL_CONTAINER="bash $provider kill-container"
  elif [ "$provider_name" = local ]; then
    sock="${CONSUL_REGISTRAR_E2E_DIR:-/var/lib/consul-registrar-e2e}/run/containerd.sock"
    export E2E_KILL_CONTAINER="ctr --address $sock -n k8s.io task kill -s SIGKILL"
    # The frozen Consul agent of test_hardening.py (item 3): stopped, its sockets still accept.
    export E2E_STOP_CONTAINER="ctr --address $sock -n k8s.io task kill -s SIGSTOP"
  fi
fi

export PYTHONDONTWRITEBYTECODE=1
log "running the suite against $(kubectl config current-context 2>/dev/null || echo "$KUBECONFIG")"
# shellcheck disable=SC2086 # E2E_PYTEST_ARGS is a list of words
"$PYTHON" -m pytest tests/e2e/suite -p no:cacheprovider -s -rfEs --durations=0 ${E2E_PYTEST_ARGS:-}
