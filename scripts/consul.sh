#!/usr/bin/env bash
# Prints the path of a usable `consul` binary of the pinned release, providing it if needed.
#
# Order of preference:
#   1. $CONSUL_BIN, used as is (it must exist and be executable);
#   2. a `consul` on PATH whose version is the pinned one;
#   3. a cached build under ${XDG_CACHE_HOME:-~/.cache}/consul-registrar/consul/<version>/;
#   4. a build from Consul's Go module at the pinned version (machine's Go toolchain, Go module proxy);
#   5. without Go: the official release archive (needs curl and unzip, and releases.hashicorp.com).
# Everything but the final path goes to stderr. Safe to run concurrently (flock) and idempotent.
set -euo pipefail

CONSUL_VERSION="${CONSUL_VERSION:-1.22.3}"
cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
dest_dir="$cache_root/consul/$CONSUL_VERSION"
dest="$dest_dir/consul"
# Go's module and build caches under the project's cache, like every other Go build here: nothing
# lands in ~/go or ~/.cache/go-build.
export GOMODCACHE="$cache_root/go/mod"
export GOCACHE="$cache_root/go/build"

log() { printf 'consul.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  cat >&2 <<HELP
consul.sh: how to provide Consul $CONSUL_VERSION:
  - set CONSUL_BIN=/path/to/consul (any 1.20+ release works), or
  - put consul $CONSUL_VERSION on PATH, or
  - install Go 1.25+ (https://go.dev/dl) so this script can build it from the Go module proxy, or
  - install curl and unzip with access to releases.hashicorp.com so it can download the release.
HELP
  exit 1
}

# sed reads the whole output: `head -n 1` would close the pipe early, and under pipefail Consul's
# SIGPIPE (exit 141) killed this script whenever the build finished on a loaded machine.
version_of() { "$1" version 2>/dev/null | sed -n '1s/^Consul v\([0-9][0-9.]*\).*/\1/p'; }

if [ -n "${CONSUL_BIN:-}" ]; then
  [ -x "$CONSUL_BIN" ] || die "CONSUL_BIN=$CONSUL_BIN is not an executable file"
  printf '%s\n' "$CONSUL_BIN"
  exit 0
fi

if on_path=$(command -v consul 2>/dev/null) && [ "$(version_of "$on_path")" = "$CONSUL_VERSION" ]; then
  printf '%s\n' "$on_path"
  exit 0
fi

# Fast path: a cache hit needs no lock.
if [ -x "$dest" ]; then
  printf '%s\n' "$dest"
  exit 0
fi

mkdir -p "$dest_dir"
exec 9>"$dest_dir.lock"
if ! flock -n 9; then
  log "another consul.sh is providing Consul $CONSUL_VERSION; waiting for it"
  flock 9
fi
if [ -x "$dest" ]; then # built while we waited
  printf '%s\n' "$dest"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/consul-build.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

build_from_go_module() {
  local mod="github.com/hashicorp/consul@v$CONSUL_VERSION" src
  log "building Consul $CONSUL_VERSION from the Go module $mod with $(go version) (a few minutes, once)"
  src=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "$mod" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -n "$src" ] && [ -d "$src" ] || { log "go mod download $mod failed"; return 1; }
  cp -R "$src" "$work/src"
  chmod -R u+w "$work/src"
  cd "$work/src"
  # The module's go.mod points its own submodules (api, sdk, proto-public, ...) at local directories
  # that the module zip does not contain; use the published versions it requires instead.
  local m
  while read -r m; do
    go mod edit -dropreplace="$m"
  done < <(awk '{ if ($1 == "replace") { $1 = ""; $0 = $0 } } $2 == "=>" && $3 ~ /^\.\.?\// { print $1 }' go.mod)
  GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/consul" . >&2 || {
    log "go build failed"
    return 1
  }
}

download_release() {
  local url="https://releases.hashicorp.com/consul/${CONSUL_VERSION}/consul_${CONSUL_VERSION}_linux_amd64.zip"
  if ! command -v curl >/dev/null || ! command -v unzip >/dev/null; then
    log "curl or unzip missing"
    return 1
  fi
  log "downloading $url"
  curl -fsSL -o "$work/consul.zip" "$url" && unzip -q -o "$work/consul.zip" consul -d "$work"
}

tried=()
if command -v go >/dev/null 2>&1; then
  tried+=("build from the Go module")
  build_from_go_module || true
else
  log "no Go toolchain on PATH"
fi
if [ ! -x "$work/consul" ]; then
  tried+=("download of the release archive")
  download_release || true
fi
[ -x "$work/consul" ] || die "could not provide Consul $CONSUL_VERSION (tried: ${tried[*]:-nothing})"

got=$(version_of "$work/consul")
[ "$got" = "$CONSUL_VERSION" ] || die "built binary reports version '${got:-unknown}', expected $CONSUL_VERSION"
mv "$work/consul" "$dest"
log "cached Consul $CONSUL_VERSION at $dest"
printf '%s\n' "$dest"
