#!/usr/bin/env bash
# The kind provider of the e2e suite (tests/e2e/run.sh kind, `make e2e`): a kind cluster of one
# control plane and two workers, made here with nothing pulled; the assertions live in
# tests/e2e/suite and run against any cluster. The same verbs as tests/e2e/cluster/local.sh:
#
#   up                start a Docker engine of our own, load the node image (tests/e2e/kind/node-image.sh
#                     builds and caches it), create the cluster, install the CNI and routes
#   down              delete it all: the cluster, the engine and its data root, the host's routes
#                     (FORWARD policy and ip_forward as they were); safe when there is none
#   env               print `export KUBECONFIG=… NODE_IP=…`
#   load ARCHIVE...   load image archives (docker-archive) into every node (`kind load image-archive`)
#   kill-container ID / stop-container ID / continue-container ID
#                     SIGKILL / SIGSTOP / SIGCONT a container by its runtime id, on whichever node runs it
#   workers           the worker nodes' names, one a line
#   kill-node NAME / pause-node NAME / unpause-node NAME
#                     `docker kill` / `docker pause` / `docker unpause` of a node (a node lost: the
#                     multi-node scenarios of tests/e2e/suite/test_nodes.py)
#   restore-node NAME start a killed node again and redo the pod networking (its routes are gone)
#
# The engine: Debian's docker.io (`apt-get install docker.io`; no systemd needed), started by `up` as
# root with its own data root, exec root, pidfile and socket under $KIND_STATE, `--iptables=false
# --ip-forward=false --bridge=none` (it leaves the host's firewall and forwarding alone), and a runc
# wrapper as its default runtime that drops CAP_SYS_RESOURCE from every container (this machine's
# bounding set lacks it, and kind's --privileged nodes fail without the drop). Set
# KIND_DOCKER=system to use the engine `docker` already talks to instead (then nothing of it is
# started or stopped).
#
# Networking: a docker network `kind` of our own (KIND_SUBNET, default 172.30.0.0/24, bridge
# kind-cr0); kind's CNI is off (kindnetd cannot be had); each node gets a ptp + host-local + portmap
# conflist for its pod CIDR (KIND_POD_SUBNET, default 10.246.0.0/16), a route to every other
# node's pod CIDR via that node's IP, and the host one to each node's pod CIDR via the node, so the
# suite reaches pods through the bridge and never through the host's default route. Nodes reach
# nothing beyond the bridge: nothing is masqueraded, and three rules at the top of the host's
# FORWARD chain (removed by `down`) accept what the bridge switches between nodes (bridged frames
# pass the host's iptables when br_netfilter is loaded) and drop whatever would be routed from the
# bridge to another interface or back. Forwarding is on inside each node (its own network
# namespace), never changed on the host. No NetworkPolicy enforcement.
set -euo pipefail
cd "$(dirname "$0")/../../.."

CLUSTER="${KIND_CLUSTER_NAME:-consul-registrar-e2e}"
STATE="${KIND_STATE:-/var/lib/consul-registrar-e2e-kind}"
SUBNET="${KIND_SUBNET:-172.30.0.0/24}"
POD_SUBNET="${KIND_POD_SUBNET:-10.246.0.0/16}"
SERVICE_SUBNET="${KIND_SERVICE_SUBNET:-10.97.0.0/16}"
BRIDGE=kind-cr0
KIND_DOCKER="${KIND_DOCKER:-own}"
kubeconfig="$STATE/kubeconfig"
node="$CLUSTER-control-plane"
sock="$STATE/run/docker.sock"

log() { printf 'kind-provider: [%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

if [ "$KIND_DOCKER" = own ]; then
  export DOCKER_HOST="unix://$sock"
  # The engine's own CLI (Debian's, the version of its dockerd) ahead of any other `docker` on PATH,
  # for this script, node-image.sh and kind: a newer CLI may ask for an API the engine lacks.
  engine_cli="${KIND_DOCKER_CLI:-/usr/bin/docker}"
  if [ -x "$engine_cli" ] && [ "$(command -v docker || true)" != "$engine_cli" ]; then
    cli_dir=$(mktemp -d)
    trap 'rm -rf "$cli_dir"' EXIT
    ln -s "$engine_cli" "$cli_dir/docker"
    export PATH="$cli_dir:$PATH"
  fi
fi
kind_bin=$(bash tests/e2e/kind/node-image.sh kind)
kind_() { "$kind_bin" "$@"; }
kube_bin=$(bash scripts/kubernetes.sh)
kubectl_() { "$kube_bin/kubectl" --kubeconfig "$kubeconfig" "$@"; }

nodes() { kind_ get nodes --name "$CLUSTER" 2>/dev/null | sort; }

# ---- the engine ------------------------------------------------------------------------------------

start_dockerd() {
  [ "$(id -u)" -eq 0 ] || die "the kind provider starts its own Docker engine: run as root (or KIND_DOCKER=system)"
  command -v dockerd >/dev/null 2>&1 || die "dockerd not found: apt-get install docker.io"
  mkdir -p "$STATE/run" "$STATE/exec" "$STATE/data"
  # The host's forwarding state, restored at `down` whatever happens in between.
  [ -f "$STATE/host-forward" ] || {
    printf '%s %s\n' "$(cat /proc/sys/net/ipv4/ip_forward)" "$(iptables -S FORWARD 2>/dev/null | sed -n 's/^-P FORWARD //p')"
  } >"$STATE/host-forward"
  cat >"$STATE/runc-wrapper" <<'WRAPPER'
#!/bin/sh
# runc without CAP_SYS_RESOURCE (the host's bounding set lacks it): drops it from the bundle's
# config.json before `runc create|run`, and from the process file of `runc exec --process`
# (`docker exec --privileged`), then runs Debian's runc.
bundle=""
process=""
prev=""
for a in "$@"; do
  case "$prev" in --bundle | -b) bundle=$a ;; --process | -p) process=$a ;; esac
  case "$a" in --bundle=*) bundle=${a#--bundle=} ;; --process=*) process=${a#--process=} ;; esac
  prev=$a
done
drop() { # FILE JQ-PATH
  jq -c "if $2 then $2 |= with_entries(.value |= map(select(. != \"CAP_SYS_RESOURCE\"))) else . end" "$1" >"$1.tmp" &&
    mv -f "$1.tmp" "$1"
}
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ]; then drop "$bundle/config.json" .process.capabilities; fi
if [ -n "$process" ] && [ -f "$process" ]; then drop "$process" .capabilities; fi
exec /usr/sbin/runc "$@"
WRAPPER
  chmod 0755 "$STATE/runc-wrapper"
  printf '{}\n' >"$STATE/daemon.json"
  log "starting dockerd (data root $STATE/data, socket $sock, --iptables=false)"
  nohup dockerd --config-file "$STATE/daemon.json" --data-root "$STATE/data" --exec-root "$STATE/exec" \
    --pidfile "$STATE/run/dockerd.pid" -H "unix://$sock" --iptables=false --ip-forward=false --ip-masq=false \
    --bridge=none --add-runtime "kind-runc=$STATE/runc-wrapper" --default-runtime kind-runc \
    --log-level warn >"$STATE/dockerd.log" 2>&1 &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  tail -20 "$STATE/dockerd.log" >&2
  die "dockerd did not answer within 60 s (log: $STATE/dockerd.log)"
}

stop_dockerd() {
  local pid
  [ -f "$STATE/run/dockerd.pid" ] || return 0
  pid=$(cat "$STATE/run/dockerd.pid")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping dockerd ($pid)"
    docker ps -aq 2>/dev/null | xargs -r docker rm -f >/dev/null 2>&1 || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$STATE/run/dockerd.pid"
}

# ---- the host's FORWARD chain -------------------------------------------------------------------

# The rules `up` inserts at the top of the host's FORWARD chain, and `down` deletes (each once).
forward_rules=(
  "-i $BRIDGE -o $BRIDGE -j ACCEPT"
  "-i $BRIDGE -j DROP"
  "-o $BRIDGE -j DROP"
)

forward_rules_add() {
  local i rule
  for ((i = ${#forward_rules[@]} - 1; i >= 0; i--)); do
    rule=${forward_rules[$i]}
    # shellcheck disable=SC2086 # a rule is a list of words
    iptables -C FORWARD $rule 2>/dev/null || iptables -I FORWARD 1 $rule
  done
  : >"$STATE/forward-rules"
}

forward_rules_del() {
  local rule
  [ -f "$STATE/forward-rules" ] || return 0
  for rule in "${forward_rules[@]}"; do
    # shellcheck disable=SC2086 # a rule is a list of words
    while iptables -C FORWARD $rule 2>/dev/null; do iptables -D FORWARD $rule; done
  done
  rm -f "$STATE/forward-rules"
}

# ---- up ---------------------------------------------------------------------------------------------

up() {
  local t0=$SECONDS
  if [ "$KIND_DOCKER" = own ]; then
    [ ! -S "$sock" ] || die "$sock exists: a previous cluster is up; run '$0 down' first"
    start_dockerd
  fi
  docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
  if nodes | grep -q .; then
    die "a kind cluster named $CLUSTER already exists: run '$0 down' or set KIND_CLUSTER_NAME"
  fi
  local image
  image=$(bash tests/e2e/kind/node-image.sh node) || die "the node image could not be made"
  if ! docker network inspect kind >/dev/null 2>&1; then
    docker network create -d bridge --subnet "$SUBNET" -o "com.docker.network.bridge.name=$BRIDGE" \
      -o com.docker.network.bridge.enable_ip_masquerade=false kind >/dev/null
  fi
  mkdir -p "$STATE"
  forward_rules_add
  cat >"$STATE/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: true
  podSubnet: "$POD_SUBNET"
  serviceSubnet: "$SERVICE_SUBNET"
  ipFamily: ipv4
nodes:
- role: control-plane
- role: worker
- role: worker
EOF
  log "kind create cluster ($image, 1 control plane + 2 workers)"
  kind_ create cluster --name "$CLUSTER" --image "$image" --kubeconfig "$kubeconfig" \
    --config "$STATE/kind.yaml" --retain >&2 || die "kind create cluster failed"
  network
  log "waiting for the nodes to be Ready"
  kubectl_ wait --for=condition=Ready node --all --timeout=180s >&2 || die "the nodes did not become Ready"
  kubectl_ -n kube-system rollout status deployment/coredns --timeout=180s >&2 || die "CoreDNS did not become ready"
  log "cluster up in $((SECONDS - t0)) s"
}

# Pod networking: the ptp conflist on each node, routes between nodes and from the host.
network() {
  local n ip cidr m mip mcidr
  declare -A ips cidrs
  for n in $(nodes); do
    [ "$(docker inspect -f '{{.State.Running}}' "$n")" = true ] || continue
    ips[$n]=$(docker inspect -f '{{(index .NetworkSettings.Networks "kind").IPAddress}}' "$n")
    cidr=""
    for _ in $(seq 60); do
      cidr=$(kubectl_ get node "$n" -o jsonpath='{.spec.podCIDR}' 2>/dev/null || true)
      [ -z "$cidr" ] || break
      sleep 1
    done
    [ -n "$cidr" ] || die "node $n got no pod CIDR"
    cidrs[$n]=$cidr
  done
  touch "$STATE/host-routes"
  for n in "${!ips[@]}"; do
    ip=${ips[$n]}
    cidr=${cidrs[$n]}
    log "node $n: $ip, pods $cidr"
    # Forwarding in the node's own network namespace (a new one inherits the host's setting).
    docker exec "$n" sysctl -qw net.ipv4.ip_forward=1
    docker exec -i "$n" sh -c 'mkdir -p /etc/cni/net.d && cat >/etc/cni/net.d/10-ptp.conflist' <<EOF
{
  "cniVersion": "0.4.0",
  "name": "ptp",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "mtu": 1500,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "$cidr" }]], "routes": [{ "dst": "0.0.0.0/0" }] }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
    for m in "${!ips[@]}"; do
      [ "$m" != "$n" ] || continue
      mip=${ips[$m]}
      mcidr=${cidrs[$m]}
      docker exec "$n" ip route replace "$mcidr" via "$mip" >&2
    done
    ip route replace "$cidr" via "$ip" dev "$BRIDGE"
    grep -qxF "$cidr" "$STATE/host-routes" || printf '%s\n' "$cidr" >>"$STATE/host-routes"
  done
}

# ---- down -------------------------------------------------------------------------------------------

down() {
  local cidr fwd pol
  if [ -f "$STATE/host-routes" ]; then
    while read -r cidr; do ip route del "$cidr" 2>/dev/null || true; done <"$STATE/host-routes"
    rm -f "$STATE/host-routes"
  fi
  if docker info >/dev/null 2>&1; then
    if nodes | grep -q .; then
      log "kind delete cluster --name $CLUSTER"
      kind_ delete cluster --name "$CLUSTER" >&2 || true
    fi
    docker network rm kind >/dev/null 2>&1 || true
  fi
  forward_rules_del
  if [ "$KIND_DOCKER" = own ]; then
    stop_dockerd
    ip link del "$BRIDGE" 2>/dev/null || true
    # What the engine may leave mounted (netns, overlay layers) before its directories go.
    grep -F " $STATE/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    if [ -f "$STATE/host-forward" ]; then
      read -r fwd pol <"$STATE/host-forward" || true
      [ -z "$fwd" ] || echo "$fwd" >/proc/sys/net/ipv4/ip_forward
      [ -z "$pol" ] || iptables -P FORWARD "$pol"
    fi
    rm -rf "$STATE"
  else
    rm -f "$kubeconfig"
  fi
}

env_() {
  [ -f "$kubeconfig" ] || die "no cluster: run '$0 up' first"
  local ip
  ip=$(docker inspect -f '{{(index .NetworkSettings.Networks "kind").IPAddress}}' "$node")
  # E2E_WORKERS: the suite collects test_nodes.py only with two or more.
  printf 'export KUBECONFIG=%q NODE_IP=%q E2E_WORKERS=2' "$kubeconfig" "$ip"
  [ "$KIND_DOCKER" != own ] || printf ' DOCKER_HOST=%q' "$DOCKER_HOST"
  printf '\n'
}

load() {
  local archive
  for archive in "$@"; do
    log "kind load image-archive $archive"
    kind_ load image-archive --name "$CLUSTER" "$archive" >&2
  done
}

# signal SIG ID: the container runs on one node; the others say it is not there.
signal() {
  local sig=$1 id=${2#containerd://} n
  for n in $(nodes); do
    if docker exec "$n" ctr -n k8s.io task kill -s "$sig" "$id" >/dev/null 2>&1; then
      return 0
    fi
  done
  die "no node runs container $id"
}

# workers: the worker nodes (kind's role label), one a line.
workers() {
  local n
  for n in $(nodes); do
    [ "$(docker inspect -f '{{index .Config.Labels "io.x-k8s.kind.role"}}' "$n")" != worker ] || echo "$n"
  done
}

node_arg() {
  [ $# -eq 1 ] || die "usage: $0 VERB NODE"
  nodes | grep -qxF "$1" || die "no node $1 in cluster $CLUSTER"
}

# restore-node NAME: a killed node started again; docker may give it another address, and its
# routes are gone with its network namespace, so the pod networking is done again for all nodes.
restore_node() {
  local n=$1 cidr
  [ "$(docker inspect -f '{{.State.Running}}' "$n")" = true ] || docker start "$n" >/dev/null
  # A deleted Node object is registered anew by its kubelet, with a pod CIDR of its own.
  for _ in $(seq 180); do
    [ -z "$(kubectl_ get node "$n" -o jsonpath='{.spec.podCIDR}' 2>/dev/null || true)" ] || break
    sleep 1
  done
  # The host's routes of the old addresses go; network() adds the current ones.
  if [ -f "$STATE/host-routes" ]; then
    while read -r cidr; do ip route del "$cidr" 2>/dev/null || true; done <"$STATE/host-routes"
    : >"$STATE/host-routes"
  fi
  network
}

case "${1:-}" in
up) up ;;
down) down ;;
env) env_ ;;
load)
  shift
  load "$@"
  ;;
kill-container)
  [ $# -eq 2 ] || die "usage: $0 kill-container ID"
  signal SIGKILL "$2"
  ;;
stop-container)
  [ $# -eq 2 ] || die "usage: $0 stop-container ID"
  signal SIGSTOP "$2"
  ;;
continue-container)
  [ $# -eq 2 ] || die "usage: $0 continue-container ID"
  signal SIGCONT "$2"
  ;;
workers) workers ;;
kill-node)
  shift
  node_arg "$@"
  docker kill "$1" >/dev/null
  ;;
pause-node)
  shift
  node_arg "$@"
  docker pause "$1" >/dev/null
  ;;
unpause-node)
  shift
  node_arg "$@"
  docker unpause "$1" >/dev/null
  ;;
restore-node)
  shift
  node_arg "$@"
  restore_node "$1"
  ;;
*)
  echo "usage: $0 up|down|env|load ARCHIVE...|kill-container ID|stop-container ID|continue-container ID|workers|kill-node NODE|pause-node NODE|unpause-node NODE|restore-node NODE" >&2
  exit 2
  ;;
esac
