#!/usr/bin/env bash
# The kind provider of the e2e suite (tests/e2e/run.sh kind, `make e2e-kind`): provisions a kind
# cluster and loads images into it; the assertions live in tests/e2e/suite and run against any
# cluster. The same verbs as tests/e2e/cluster/local.sh:
#
#   up                create the cluster (its own kubeconfig; ~/.kube/config is never touched)
#   down              delete it (and its state directory); safe when there is none
#   env               print `export KUBECONFIG=… NODE_IP=…`
#   load ARCHIVE...   load image archives (docker-archive or OCI tar) into the node
#   images            build the suite's images with docker (for machines without buildah) and
#                     print the archives' paths, one per line
#   kill-container ID SIGKILL a container of the node by its runtime id (`containerd://` optional)
#
# Needs docker (with an engine) and kind 0.21+ (node images are Kubernetes 1.29+).
# Environment: KIND_CLUSTER_NAME (consul-registrar-e2e), KIND_NODE_IMAGE (kind's default).
set -euo pipefail
cd "$(dirname "$0")/../../.."

CLUSTER="${KIND_CLUSTER_NAME:-consul-registrar-e2e}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-}"
CONSUL_VERSION=1.22.3
state="${TMPDIR:-/tmp}/consul-registrar-e2e-kind/$CLUSTER"
kubeconfig="$state/kubeconfig"
node="$CLUSTER-control-plane"

log() { printf 'kind-provider: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

need() {
  local tool
  for tool in docker kind; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH"
  done
}

up() {
  need
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    die "a kind cluster named $CLUSTER already exists: run '$0 down' or set KIND_CLUSTER_NAME"
  fi
  mkdir -p "$state"
  local args=(--name "$CLUSTER" --kubeconfig "$kubeconfig" --wait 180s)
  [ -z "$KIND_NODE_IMAGE" ] || args+=(--image "$KIND_NODE_IMAGE")
  kind create cluster "${args[@]}" >&2
}

down() {
  need
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind delete cluster --name "$CLUSTER" >&2
  fi
  rm -rf "$state"
}

env_() {
  [ -f "$kubeconfig" ] || die "no cluster: run '$0 up' first"
  local ip
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$node" | awk '{print $1}')
  printf 'export KUBECONFIG=%q NODE_IP=%q\n' "$kubeconfig" "$ip"
}

load() {
  need
  local archive
  for archive in "$@"; do
    kind load image-archive --name "$CLUSTER" "$archive" >&2
  done
}

# The images scripts/images.sh builds with buildah, built with docker instead: the sidecar and the
# demo app from the Dockerfile, the Go peers from tests/interop/go, and Consul's release image
# under the name deploy/consul-dev uses.
images() {
  command -v docker >/dev/null 2>&1 || die "docker not found on PATH"
  local out="$state/images" revision version
  mkdir -p "$out"
  revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  version=$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)
  local args=(--build-arg VERSION="$version" --build-arg REVISION="$revision")
  docker build "${args[@]}" -t consul-registrar:dev . >&2
  docker build "${args[@]}" --target demo-app -t consul-registrar-demo-app:dev . >&2
  local peer
  for peer in hello-server hello-client; do
    docker build -t "consul-registrar-$peer:dev" -f - tests/interop/go >&2 <<DOCKERFILE
FROM golang:1.25-bookworm AS build
WORKDIR /src
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -o /out/$peer ./$peer
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/$peer /usr/local/bin/$peer
ENTRYPOINT ["/usr/local/bin/$peer"]
DOCKERFILE
  done
  docker pull "hashicorp/consul:$CONSUL_VERSION" >&2
  docker tag "hashicorp/consul:$CONSUL_VERSION" "consul:$CONSUL_VERSION"
  local image file
  for image in consul-registrar:dev consul-registrar-demo-app:dev consul-registrar-hello-server:dev \
    consul-registrar-hello-client:dev "consul:$CONSUL_VERSION"; do
    file="$out/${image//[:\/]/_}.tar"
    docker save -o "$file" "$image"
    echo "$file"
  done
}

kill_container() {
  [ $# -eq 1 ] || die "usage: $0 kill-container ID"
  docker exec "$node" ctr -n k8s.io task kill -s SIGKILL "${1#containerd://}" >&2
}

case "${1:-}" in
up) up ;;
down) down ;;
env) env_ ;;
load)
  shift
  load "$@"
  ;;
images) images ;;
kill-container)
  shift
  kill_container "$@"
  ;;
*)
  echo "usage: $0 up|down|env|load ARCHIVE...|images|kill-container ID" >&2
  exit 2
  ;;
esac
