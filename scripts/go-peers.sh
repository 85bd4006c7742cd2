#!/usr/bin/env bash
# Builds the Go peers of tests/interop/go (the tutorial's hello server and its Consul-resolving
# client) with the machine's Go toolchain and prints the directory that holds both binaries.
# The build is cached under ${XDG_CACHE_HOME:-~/.cache}/consul-registrar/go-peers/<hash of the
# sources>, so a second run returns at once. Safe to run concurrently (flock).
set -euo pipefail
cd "$(dirname "$0")/../tests/interop/go"

log() { printf 'go-peers.sh: %s\n' "$*" >&2; }
command -v go >/dev/null 2>&1 || {
  log "error: no Go toolchain on PATH; install Go 1.24+ (https://go.dev/dl) to build the interop peers"
  exit 1
}

hash=$(cat go.mod go.sum ./*/*.go | sha256sum | cut -c1-16)
cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
dest="$cache_root/go-peers/$hash"
if [ -x "$dest/hello-server" ] && [ -x "$dest/hello-client" ]; then
  printf '%s\n' "$dest"
  exit 0
fi
mkdir -p "$dest"
exec 9>"$dest.lock"
flock 9
if [ ! -x "$dest/hello-server" ] || [ ! -x "$dest/hello-client" ]; then
  log "building the Go peers with $(go version)"
  tmp=$(mktemp -d "$dest.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  CGO_ENABLED=0 go build -trimpath -o "$tmp/" ./hello-server ./hello-client >&2
  mv "$tmp/hello-server" "$tmp/hello-client" "$dest/"
fi
printf '%s\n' "$dest"
