#!/usr/bin/env bash
# Prints the path of the real grpc_health_probe at the pinned release, building it once from its Go
# module (github.com/grpc-ecosystem/grpc-health-probe) with the machine's Go toolchain into
#
#   ${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar/grpc-health-probe/<version>/grpc_health_probe
#
# tests/probe_compat.rs runs it beside `consul-registrar probe` to keep the exit codes identical.
# $GRPC_HEALTH_PROBE, if set, is used as is. Go's module and build caches stay under the project's
# cache directory (go/mod, go/build). Everything but the final path goes to stderr. Safe to run
# concurrently (flock) and idempotent. CONSUL_REGISTRAR_CACHE overrides the cache root.
set -euo pipefail

GRPC_HEALTH_PROBE_VERSION="${GRPC_HEALTH_PROBE_VERSION:-0.4.62}"
cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
dest_dir="$cache_root/grpc-health-probe/v$GRPC_HEALTH_PROBE_VERSION"
dest="$dest_dir/grpc_health_probe"
export GOMODCACHE="$cache_root/go/mod"
export GOCACHE="$cache_root/go/build"

log() { printf 'grpc-health-probe.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  cat >&2 <<HELP
grpc-health-probe.sh: how to provide grpc_health_probe v$GRPC_HEALTH_PROBE_VERSION:
  - set GRPC_HEALTH_PROBE=/path/to/grpc_health_probe, or
  - install Go (https://go.dev/dl) so this script can build it from the Go module proxy.
HELP
  exit 1
}

if [ -n "${GRPC_HEALTH_PROBE:-}" ]; then
  [ -x "$GRPC_HEALTH_PROBE" ] || die "GRPC_HEALTH_PROBE=$GRPC_HEALTH_PROBE is not an executable file"
  printf '%s\n' "$GRPC_HEALTH_PROBE"
  exit 0
fi

# Fast path: a cache hit needs neither the lock nor Go.
if [ -x "$dest" ]; then
  printf '%s\n' "$dest"
  exit 0
fi

command -v go >/dev/null 2>&1 || die "no Go toolchain on PATH"

mkdir -p "$dest_dir"
exec 9>"$dest_dir.lock"
if ! flock -n 9; then
  log "another grpc-health-probe.sh is building v$GRPC_HEALTH_PROBE_VERSION; waiting for it"
  flock 9
fi
if [ -x "$dest" ]; then # built while we waited
  printf '%s\n' "$dest"
  exit 0
fi

work=$(mktemp -d "$dest_dir.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mod="github.com/grpc-ecosystem/grpc-health-probe@v$GRPC_HEALTH_PROBE_VERSION"
log "building grpc_health_probe from the Go module $mod with $(go version) (once: downloads grpc-go, then compiles; 1-2 minutes on 2 cores with a cold Go cache)"
# `go install pkg@version` uses the module's own go.mod and go.sum; the machine's toolchain.
if ! GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$work" GOFLAGS=-trimpath go install "$mod" >&2; then
  die "\`go install $mod\` failed (see above; modules come from GOPROXY=$(go env GOPROXY))"
fi
[ -x "$work/grpc-health-probe" ] || die "go install produced no grpc-health-probe binary in $work"
"$work/grpc-health-probe" -version >&2 || true
mv "$work/grpc-health-probe" "$dest"
log "cached grpc_health_probe v$GRPC_HEALTH_PROBE_VERSION at $dest"
printf '%s\n' "$dest"
