#!/usr/bin/env bash
# The pod simulation (`make podsim`): the reliability scenarios of tests/podsim.rs with their figures
# (FIGURE lines). The scenarios on network namespaces need root and are #[ignore]d, so that a plain
# `cargo test` lists them as ignored; this script runs them as root. Without root it refuses (exit 1)
# and names every scenario it did not run; PODSIM_ALLOW_SKIP=1 runs the others and still names the
# ones NOT RUN. Under CI=true not running them is always a failure.
#
# The binaries come from `make bins` (CONSUL_REGISTRAR_BIN, DEMO_APP_BIN); Consul from scripts/consul.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'podsim.sh: %s\n' "$*" >&2; }

CONSUL_BIN="$(bash scripts/consul.sh)"
export CONSUL_BIN

if [ "$(id -u)" = 0 ]; then
  exec cargo test --locked --test podsim -- --include-ignored --nocapture --test-threads 8
fi

# Not root: the scenarios that need it, as the test binary lists them.
mapfile -t not_run < <(cargo test --locked --test podsim -- --ignored --list 2>/dev/null |
  sed -n 's/: test$//p')
n=${#not_run[@]}
report() {
  log "$n scenarios NOT RUN (not root: the pod simulation needs network namespaces):"
  printf '  NOT RUN: %s\n' "${not_run[@]}" >&2
}
if [ "${CI:-}" = true ]; then
  report
  log "error: under CI=true the pod simulation must run: run it as root"
  exit 1
fi
if [ "${PODSIM_ALLOW_SKIP:-0}" != 1 ]; then
  report
  log "error: run it as root (sudo -E make podsim), or set PODSIM_ALLOW_SKIP=1 to go on without them"
  exit 1
fi
status=0
cargo test --locked --test podsim -- --nocapture --test-threads 8 || status=$?
report
exit "$status"
