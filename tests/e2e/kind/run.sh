#!/usr/bin/env bash
# The kind e2e suite: consul-registrar on a real Kubernetes cluster, judged by what Consul says.
#
#   1. builds the sidecar image and the demo app image (Dockerfile, targets consul-registrar and
#      demo-app), creates a kind cluster and loads both images into it;
#   2. installs the Consul dev server (deploy/consul-dev) and the chart with the demo values
#      (charts/consul-registrar/ci/demo-values.yaml: three pods of the demo app, native sidecar);
#   3. asserts through Consul's HTTP API (kubectl port-forward):
#      - three instances, all passing, one per pod, at the pod IPs;
#      - one demo app flipped to NOT_SERVING (kubectl exec ... demo-app set) turns critical, and
#        passing again when flipped back;
#      - a deleted pod's instance turns critical while its app still serves, and is gone before the
#        app container stops (the preStop drain);
#      - scaled to 0, no instance is left, well before Consul's own reaper could have removed one;
#   4. deletes the cluster (also on failure; KEEP_CLUSTER=1 keeps it for a look).
#
# Needs docker (with an engine), kind, kubectl, helm and python3; skips (exit 0) when one of docker,
# kind, kubectl or helm is not installed. Takes 5-15 minutes, mostly the image build.
# Environment: KIND_CLUSTER_NAME (default consul-registrar-e2e), KIND_NODE_IMAGE (kind's default
# node image otherwise; Kubernetes 1.29+), CONSUL_LOCAL_PORT (18500), KEEP_CLUSTER (0).
set -euo pipefail
cd "$(dirname "$0")/../../.."

CLUSTER="${KIND_CLUSTER_NAME:-consul-registrar-e2e}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-}"
CONSUL_LOCAL_PORT="${CONSUL_LOCAL_PORT:-18500}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
NAMESPACE=hello-e2e
RELEASE=demo
DEPLOYMENT=demo-consul-registrar
SELECTOR=app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/name=consul-registrar
SERVICE=hello
# The image names charts/consul-registrar/ci/demo-values.yaml uses (pullPolicy: Never).
REGISTRAR_IMAGE=consul-registrar:dev
DEMO_IMAGE=consul-registrar-demo-app:dev
CONSUL_URL="http://127.0.0.1:$CONSUL_LOCAL_PORT"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
log() { printf 'e2e: %s\n' "$*"; }
fail() {
  printf 'e2e: FAILED: %s\n' "$*" >&2
  exit 1
}

missing=()
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "e2e/kind: SKIPPED: ${missing[*]} not found on PATH (the kind e2e suite needs docker, kind, kubectl and helm)"
  exit 0
fi
command -v python3 >/dev/null 2>&1 || fail "python3 is needed to read Consul's answers"
docker info >/dev/null 2>&1 || fail "docker is installed but no Docker engine answers (docker info failed)"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  fail "a kind cluster named $CLUSTER already exists: delete it (kind delete cluster --name $CLUSTER) or set KIND_CLUSTER_NAME"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/consul-registrar-e2e.XXXXXX")
export KUBECONFIG="$work/kubeconfig" # never touches the user's kubeconfig
cluster_created=0
port_forward_pid=""

diagnostics() {
  say "diagnostics"
  kubectl get pods -A -o wide || true
  kubectl -n "$NAMESPACE" describe pods -l "$SELECTOR" | tail -n 60 || true
  kubectl -n "$NAMESPACE" logs -l "$SELECTOR" -c consul-registrar --tail=40 --prefix || true
  kubectl -n consul logs deploy/consul --tail=40 || true
  python3 tests/e2e/kind/consul_instances.py "$CONSUL_URL" "$SERVICE" || true
}

cleanup() {
  local status=$?
  [ "$status" -eq 0 ] || [ "$cluster_created" -eq 0 ] || diagnostics
  [ -z "$port_forward_pid" ] || kill "$port_forward_pid" 2>/dev/null || true
  if [ "$cluster_created" -eq 1 ]; then
    if [ "$KEEP_CLUSTER" = 1 ]; then
      log "keeping cluster $CLUSTER (KUBECONFIG=$KUBECONFIG); delete it with: kind delete cluster --name $CLUSTER"
    else
      say "deleting the kind cluster $CLUSTER"
      kind delete cluster --name "$CLUSTER" || true
      rm -rf "$work"
    fi
  else
    rm -rf "$work"
  fi
  if [ "$status" -eq 0 ]; then log "all checks passed"; else log "failed (exit $status)"; fi
}
trap cleanup EXIT

# ---- helpers --------------------------------------------------------------------------------------

# Lines "<id> <status> <address>" for every instance of the service Consul holds. These helpers
# fail when Consul does not answer, so that an outage never reads as "no instance".
instances() { python3 tests/e2e/kind/consul_instances.py "$CONSUL_URL" "$SERVICE"; }
status_of() {
  local out
  out=$(instances) || return 1
  printf '%s\n' "$out" | awk -v id="$1" '$1 == id { print $2 }'
}
count() { # <status|any>
  local out
  out=$(instances) || return 1
  printf '%s\n' "$out" | awk -v s="$1" 'NF && ($2 == s || s == "any")' | wc -l | tr -d ' '
}
pods() { kubectl -n "$NAMESPACE" get pods -l "$SELECTOR" --field-selector=status.phase=Running -o name | sed 's|^pod/||'; }
instance_id() { printf '%s.%s.%s' "$SERVICE" "$NAMESPACE" "$1"; }

# wait_for <seconds> <description> <command...>: polls every 0.25 s.
wait_for() {
  local timeout=$1 what=$2 deadline
  shift 2
  deadline=$(($(date +%s) + timeout))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${timeout}s waiting for: $what"
    sleep 0.25
  done
  log "ok: $what"
}
all_passing() {
  local passing total
  passing=$(count passing) && total=$(count any) && [ "$passing" = "$1" ] && [ "$total" = "$1" ]
}
none_left() {
  local total
  total=$(count any) && [ "$total" = 0 ]
}
no_pods() { [ -z "$(kubectl -n "$NAMESPACE" get pods -l "$SELECTOR" -o name)" ]; }
is_status() {
  local status
  status=$(status_of "$1") && [ "$status" = "$2" ]
}
app_state() { # running | terminated | waiting | gone
  local state
  state=$(kubectl -n "$NAMESPACE" get pod "$1" -o jsonpath='{.status.containerStatuses[?(@.name=="app")].state}' 2>/dev/null) || {
    echo gone
    return
  }
  case "$state" in
  *'"running"'*) echo running ;;
  *'"terminated"'*) echo terminated ;;
  *) echo waiting ;;
  esac
}

# ---- 1. images and cluster ------------------------------------------------------------------------

say "building the images ($REGISTRAR_IMAGE, $DEMO_IMAGE)"
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
version=$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2) # the Dockerfile checks it against Cargo.toml
docker build --build-arg VERSION="$version" --build-arg REVISION="$revision" -t "$REGISTRAR_IMAGE" .
docker build --build-arg VERSION="$version" --build-arg REVISION="$revision" --target demo-app -t "$DEMO_IMAGE" .
docker image ls "$REGISTRAR_IMAGE"
consul_image=$(kubectl kustomize deploy/consul-dev | sed -n 's/^ *image: *//p' | head -n 1)
[ -n "$consul_image" ] || fail "no image found in deploy/consul-dev"
docker image inspect "$consul_image" >/dev/null 2>&1 || docker pull "$consul_image"

say "creating the kind cluster $CLUSTER"
kind_args=(--name "$CLUSTER" --kubeconfig "$KUBECONFIG" --wait 120s)
[ -z "$KIND_NODE_IMAGE" ] || kind_args+=(--image "$KIND_NODE_IMAGE")
cluster_created=1 # from here on, cleanup deletes it (even if create fails half-way)
kind create cluster "${kind_args[@]}"
kubectl version
for image in "$REGISTRAR_IMAGE" "$DEMO_IMAGE" "$consul_image"; do
  kind load docker-image --name "$CLUSTER" "$image"
done

# ---- 2. Consul and the chart ----------------------------------------------------------------------

say "installing the Consul dev server (deploy/consul-dev)"
kubectl apply -k deploy/consul-dev
kubectl -n consul rollout status deployment/consul --timeout=180s
kubectl -n consul port-forward svc/consul "$CONSUL_LOCAL_PORT:8500" >"$work/port-forward.log" 2>&1 &
port_forward_pid=$!
wait_for 60 "Consul answers at $CONSUL_URL (port-forward)" instances

say "installing the chart with the demo values (3 replicas)"
helm install "$RELEASE" charts/consul-registrar --namespace "$NAMESPACE" --create-namespace \
  -f charts/consul-registrar/ci/demo-values.yaml --wait --timeout 5m
kubectl -n "$NAMESPACE" get pods -o wide

# ---- 3. what Consul says --------------------------------------------------------------------------

say "three passing instances, one per pod, at the pod IPs"
wait_for 90 "3 instances of $SERVICE, all passing" all_passing 3
instances
mapfile -t running < <(pods)
[ "${#running[@]}" -eq 3 ] || fail "expected 3 running pods, got ${#running[@]}: ${running[*]}"
for pod in "${running[@]}"; do
  ip=$(kubectl -n "$NAMESPACE" get pod "$pod" -o jsonpath='{.status.podIP}')
  line=$(instances | awk -v id="$(instance_id "$pod")" '$1 == id')
  [ "$line" = "$(instance_id "$pod") passing $ip" ] || fail "pod $pod ($ip): Consul has '${line:-nothing}'"
done
log "ok: every pod has its own passing instance at its pod IP"

say "flipping one demo app to NOT_SERVING"
flipped=${running[0]}
kubectl -n "$NAMESPACE" exec "$flipped" -c app -- /usr/local/bin/demo-app set --control 127.0.0.1:8080 not-serving
wait_for 15 "$(instance_id "$flipped") critical" is_status "$(instance_id "$flipped")" critical
[ "$(count passing)" = 2 ] || fail "the other two instances should still pass: $(instances)"
kubectl -n "$NAMESPACE" exec "$flipped" -c app -- /usr/local/bin/demo-app set --control 127.0.0.1:8080 serving
wait_for 15 "$(instance_id "$flipped") passing again" is_status "$(instance_id "$flipped")" passing

say "deleting a pod: its instance must leave Consul before its app stops"
victim=${running[1]}
victim_id=$(instance_id "$victim")
kubectl -n "$NAMESPACE" delete pod "$victim" --wait=false
# The drain: critical at once, while the app still serves (asked from inside the pod).
wait_for 10 "$victim_id critical (draining)" is_status "$victim_id" critical
[ "$(app_state "$victim")" = running ] || fail "the app container of $victim stopped before its instance was deregistered"
kubectl -n "$NAMESPACE" exec "$victim" -c consul-registrar -- \
  /usr/local/bin/consul-registrar probe --addr 127.0.0.1:50051 --service helloworld.Greeter ||
  fail "the app of $victim should still serve while its instance drains"
log "ok: $victim_id is critical while its app still serves"
# Then: gone; and whenever the app container is seen stopped, Consul (asked afterwards) has no
# instance any more.
deadline=$(($(date +%s) + 40))
gone_seen=0
while :; do
  state=$(app_state "$victim")
  status=$(status_of "$victim_id") || {
    sleep 0.2
    continue
  }
  [ -n "$status" ] || gone_seen=1
  if [ "$state" != running ]; then
    [ -z "$status" ] || fail "the app container of $victim is $state but Consul still has $victim_id ($status)"
    break
  fi
  [ "$(date +%s)" -lt "$deadline" ] || fail "$victim did not stop within 40 s (instance: ${status:-gone})"
  sleep 0.2
done
[ "$gone_seen" = 1 ] || log "note: the app stopped between two polls; Consul had no instance right after"
log "ok: $victim_id was deregistered before the app container stopped (app: $state)"
wait_for 120 "the replacement pod registered: 3 passing instances again" all_passing 3

say "scaling to 0: no instance is left"
kubectl -n "$NAMESPACE" scale deployment "$DEPLOYMENT" --replicas=0
# Drain delay 3 s: well inside 20 s. Consul's reaper (deregisterCriticalServiceAfter 1m + up to
# 30 s) could not have done it this fast.
wait_for 20 "no instance of $SERVICE in Consul" none_left
wait_for 90 "every pod gone" no_pods
sleep 5
none_left || fail "instances came back after the pods were gone: $(instances)"
log "ok: scaled to 0, Consul holds no instance of $SERVICE"
