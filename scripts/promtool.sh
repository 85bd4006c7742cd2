#!/usr/bin/env bash
# Prints the path of a `promtool` (Prometheus's own linter), providing it if needed: `promtool` on
# PATH, else a cached copy, else extracted from Debian's `prometheus` package (downloaded, not
# installed: no service is set up). Used by `make test` to lint the sidecar's /metrics output.
set -euo pipefail

cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
log() { printf 'promtool.sh: %s\n' "$*" >&2; }

if command -v promtool >/dev/null 2>&1; then
  command -v promtool
  exit 0
fi
dest_dir="$cache_root/tools/promtool"
if [ -x "$dest_dir/promtool" ]; then
  printf '%s\n' "$dest_dir/promtool"
  exit 0
fi
mkdir -p "$dest_dir"
exec 9>"$dest_dir.lock"
flock 9
if [ -x "$dest_dir/promtool" ]; then
  printf '%s\n' "$dest_dir/promtool"
  exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  log "error: no promtool on PATH and no apt-get/dpkg-deb to fetch Debian's prometheus package; install promtool (https://prometheus.io/download/) or put it on PATH"
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download prometheus >/dev/null 2>&1; then
  log "package lists missing or stale; running apt-get update"
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get download prometheus >&2 || {
    log "error: could not download Debian's prometheus package; install promtool and put it on PATH"
    exit 1
  }
fi
dpkg-deb -x prometheus_*.deb root
install -m 0755 root/usr/bin/promtool "$dest_dir/promtool"
log "cached promtool at $dest_dir/promtool"
printf '%s\n' "$dest_dir/promtool"
