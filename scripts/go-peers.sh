#!/usr/bin/env bash
# Builds the Go peers of tests/interop/go (the tutorial's hello server and its Consul-resolving
# client) with the machine's Go toolchain and prints the directory that holds both binaries:
#
#   ${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar/go-peers/<hash>/{hello-server,hello-client}
#
# <hash> covers go.mod, go.sum and every .go file (names and contents), so a change rebuilds and
# an unchanged tree returns at once, without even needing Go. Modules come from the Go module
# proxy; go.sum is authoritative (-mod=readonly: the source tree is never written). Safe to run
# concurrently (flock). The directory path is the only thing on stdout; logs go to stderr.
# CONSUL_REGISTRAR_CACHE overrides the cache root (…/consul-registrar); Go's module and build caches
# live under it too (go/mod, go/build).
set -euo pipefail

src="$(cd "$(dirname "$0")/../tests/interop/go" && pwd)"
cd "$src"

log() { printf 'go-peers.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# go.mod's go directive: the oldest toolchain that can build these sources.
go_min=$(sed -n 's/^go \([0-9][0-9.]*\)$/\1/p' go.mod)

files=(go.mod go.sum)
while IFS= read -r -d '' f; do files+=("$f"); done < <(find . -name '*.go' -type f -print0 | LC_ALL=C sort -z)
hash=$(sha256sum "${files[@]}" | sha256sum | cut -c1-16)
cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
dest="$cache_root/go-peers/$hash"
# Go's module and build caches stay under the project's cache directory (not ~/go, ~/.cache/go-build).
export GOMODCACHE="$cache_root/go/mod"
export GOCACHE="$cache_root/go/build"

built() { [ -x "$dest/hello-server" ] && [ -x "$dest/hello-client" ]; }

# Fast path: a cache hit needs neither the lock nor Go.
if built; then
  printf '%s\n' "$dest"
  exit 0
fi

# Find Go: on PATH, else where the official archive and Debian's golang-go put it.
go_bin=""
for candidate in "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
  [ -n "$candidate" ] || continue
  if [ -x "$candidate" ]; then
    go_bin="$candidate"
    break
  fi
done
if [ -z "$go_bin" ]; then
  log "error: no Go toolchain found (looked for \`go\` on PATH, /usr/local/go/bin/go, /usr/lib/go/bin/go)"
  cat >&2 <<HELP
go-peers.sh: the interop peers in $src need Go $go_min or newer to build. Install it, e.g.:
  - the official archive from https://go.dev/dl, unpacked to /usr/local/go, or
  - Debian/Ubuntu: apt-get install golang-go (only if its version is $go_min or newer),
then run this script again. The build fetches modules from the Go module proxy (GOPROXY).
HELP
  exit 1
fi

go_version=$("$go_bin" env GOVERSION 2>/dev/null) || die "$go_bin does not run (\`$go_bin env GOVERSION\` failed)"
have=${go_version#go}
if [ -n "$go_min" ] && [ "$(printf '%s\n%s\n' "$go_min" "$have" | sort -V | head -n 1)" != "$go_min" ]; then
  die "$go_bin is $go_version, but tests/interop/go/go.mod needs Go $go_min or newer; install a newer Go (https://go.dev/dl)"
fi

mkdir -p "$cache_root/go-peers"
exec 9>"$dest.lock"
if ! flock -n 9; then
  log "another go-peers.sh is building $hash; waiting for it"
  flock 9
fi
if ! built; then # not built while we waited
  log "building hello-server and hello-client with $go_version ($go_bin) into $dest" \
    "(downloads grpc-go and Consul's api module, then compiles: 1-2 minutes on 2 cores with a cold Go cache)"
  tmp=$(mktemp -d "$dest.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # The machine's toolchain, never a downloaded one; go.sum as committed.
  if ! GOTOOLCHAIN=local CGO_ENABLED=0 "$go_bin" build -mod=readonly -trimpath -o "$tmp/" ./hello-server ./hello-client >&2; then
    die "\`go build ./hello-server ./hello-client\` failed in $src (see above; modules come from GOPROXY=$("$go_bin" env GOPROXY))"
  fi
  mkdir -p "$dest"
  # Both renames stay within one file system; built() only holds once both are in place.
  mv "$tmp/hello-server" "$dest/hello-server"
  mv "$tmp/hello-client" "$dest/hello-client"
  log "built $dest"
fi
printf '%s\n' "$dest"
