#!/usr/bin/env bash
# A short, bounded fuzzing run of the manifest parser and the duration parser (cargo fuzz,
# libFuzzer, nightly Rust). Each target runs FUZZ_SECONDS (default 30) on a temporary copy of its
# committed seed corpus (fuzz/corpus/<target>/seed-*), so the repository does not change. A crash
# fails the run and prints the reproducer. The nightly toolchain (rustup, minimal profile) and
# cargo-fuzz (into the cache) are installed once when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
tool_dir="$cache_root/tools/cargo-fuzz-$CARGO_FUZZ_VERSION"
log() { printf 'fuzz.sh: %s\n' "$*" >&2; }

if ! cargo +nightly --version >/dev/null 2>&1; then
  command -v rustup >/dev/null 2>&1 || {
    log "error: cargo fuzz needs a nightly Rust toolchain, and there is no rustup to install one (https://rustup.rs)"
    exit 1
  }
  mkdir -p "$cache_root"
  exec 9>"$cache_root/nightly.lock"
  flock 9
  if ! cargo +nightly --version >/dev/null 2>&1; then
    log "installing the nightly Rust toolchain with rustup (once, for cargo fuzz; the minimal profile: a minute or two, mostly the download)"
    rustup toolchain install nightly --profile minimal >&2 || {
      log "error: rustup toolchain install nightly failed"
      exit 1
    }
  fi
  exec 9>&-
fi
if [ ! -x "$tool_dir/bin/cargo-fuzz" ]; then
  mkdir -p "$tool_dir"
  exec 9>"$tool_dir.lock"
  flock 9
  if [ ! -x "$tool_dir/bin/cargo-fuzz" ]; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $tool_dir (once: cargo install compiles it, about 2-3 minutes on 2 cores, quietly)"
    cargo install --quiet --locked --root "$tool_dir" "cargo-fuzz@$CARGO_FUZZ_VERSION" || {
      log "error: could not install cargo-fuzz from crates.io"
      exit 1
    }
  fi
  exec 9>&-
fi
export PATH="$tool_dir/bin:$PATH"
export CARGO_TARGET_DIR="$cache_root/fuzz-target"

work=$(mktemp -d "${TMPDIR:-/tmp}/consul-registrar-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
[ -d "$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release" ] ||
  log "first run: cargo fuzz builds the crate and its dependencies with nightly Rust and AddressSanitizer before fuzzing (several minutes on 2 cores, quietly; the build log is shown only on failure)"
passed=0
failed=0
for target in manifest duration; do
  mkdir -p "$work/$target"
  cp fuzz/corpus/"$target"/seed-* "$work/$target/"
  log "fuzzing $target for ${FUZZ_SECONDS}s"
  if cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$work/$target" -- \
      -max_total_time="$FUZZ_SECONDS" -max_len=4096 -artifact_prefix="$work/" >"$work/$target.log" 2>&1; then
    passed=$((passed + 1))
    grep -E '^(#[0-9]+: *DONE|Done [0-9]+ runs)' "$work/$target.log" | tail -n 1 >&2 || true
  else
    failed=$((failed + 1))
    tail -n 60 "$work/$target.log" >&2
    for crash in "$work"/crash-* "$work"/leak-* "$work"/timeout-*; do
      [ -e "$crash" ] || continue
      mkdir -p fuzz/artifacts
      cp "$crash" fuzz/artifacts/
      log "reproducer: fuzz/artifacts/$(basename "$crash") (cargo +nightly fuzz run --fuzz-dir fuzz $target fuzz/artifacts/$(basename "$crash"))"
    done
  fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
