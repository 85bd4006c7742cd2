#!/usr/bin/env bash
# `make release`: the release artifacts of the version in Cargo.toml, in one directory,
# dist/<version>/ (gitignored; RELEASE_DIR overrides it):
#
#   charts/consul-registrar-<chart version>.tgz       the chart (the library bundled inside)
#   charts/consul-registrar-lib-<lib version>.tgz     the library chart, for teams' own charts
#   charts/index.yaml                                 a Helm repository index of the two
#                                                     (URLs relative, or under HELM_REPO_URL)
#   images/consul-registrar_<version>.tar             the sidecar image, docker-archive, named
#                                                     ghcr.io/consul-registrar/consul-registrar:<version>
#   images/demo-app_<version>.tar                     the demo app image, ghcr.io/consul-registrar/demo-app:<version>
#   consul-registrar-<version>.cdx.json               CycloneDX SBOM of the binary's crates (scripts/sbom.py)
#   SHA256SUMS                                        sha256sum of every file above
#
# The images come from scripts/images.sh (buildah over host-built release binaries; see there),
# renamed to the registry names the chart and deploy/ use. Nothing is published: that needs a
# registry and credentials (docs/releasing.md says how).
#
#   bash scripts/release.sh                    # everything
#   bash scripts/release.sh --charts-only DIR  # only the packaged charts and their index, into DIR
#                                              # (what tests/k8s/test_release.py checks in make test)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'release.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

version=$(sed -n '/^\[package\]/,/^\[/ s/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || die "no version in Cargo.toml's [package]"
app_version=$(sed -n 's/^appVersion: "\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/consul-registrar/Chart.yaml)
[ "$app_version" = "$version" ] ||
  die "charts/consul-registrar/Chart.yaml's appVersion is '$app_version', Cargo.toml's version $version: the chart must default to the image it is released with"

eval "$(bash scripts/check-k8s.sh --tools)"
work=$(mktemp -d "${TMPDIR:-/tmp}/release.XXXXXX")
trap 'rm -rf "$work"' EXIT
export HELM_CACHE_HOME="$work/helm/cache" HELM_CONFIG_HOME="$work/helm/config" HELM_DATA_HOME="$work/helm/data"

package_charts() { # <dir>
  local dir=$1 index_args=()
  mkdir -p "$dir"
  # The library first: the app chart bundles it (charts/consul-registrar/charts/ links to it).
  "$HELM_BIN" lint --strict charts/consul-registrar-lib >&2
  "$HELM_BIN" package charts/consul-registrar-lib --destination "$dir" >&2
  "$HELM_BIN" lint --strict charts/consul-registrar -f charts/consul-registrar/ci/user-values.yaml >&2
  "$HELM_BIN" package charts/consul-registrar --destination "$dir" >&2
  [ -z "${HELM_REPO_URL:-}" ] || index_args=(--url "$HELM_REPO_URL")
  "$HELM_BIN" repo index "$dir" "${index_args[@]}" >&2
}

if [ "${1:-}" = --charts-only ]; then
  [ -n "${2:-}" ] || die "usage: scripts/release.sh --charts-only DIR"
  package_charts "$2"
  exit 0
fi
[ $# -eq 0 ] || die "usage: scripts/release.sh [--charts-only DIR]"

out=${RELEASE_DIR:-dist/$version}
log "consul-registrar $version -> $out"
rm -rf "$out"
mkdir -p "$out/images"
package_charts "$out/charts"

log "building the images (scripts/images.sh)"
mapfile -t archives < <(bash scripts/images.sh consul-registrar consul-registrar-demo-app)
[ "${#archives[@]}" -eq 2 ] || die "scripts/images.sh gave ${#archives[@]} archives, not 2"
release_image() { # <archive> <name in the registry> <file>
  skopeo copy --quiet "docker-archive:$1" "docker-archive:$out/images/$3:$2:$version" >&2
  log "$2:$version -> $out/images/$3"
}
release_image "${archives[0]}" ghcr.io/consul-registrar/consul-registrar "consul-registrar_$version.tar"
release_image "${archives[1]}" ghcr.io/consul-registrar/demo-app "demo-app_$version.tar"

log "SBOM of the binary's crates (scripts/sbom.py)"
python3 scripts/sbom.py >"$out/consul-registrar-$version.cdx.json"

(
  cd "$out"
  mapfile -t files < <(find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort)
  sha256sum "${files[@]}" >SHA256SUMS
)
log "done:"
(cd "$out" && find . -type f -printf '  %P (%s bytes)\n' | LC_ALL=C sort) >&2
printf '%s\n' "$out"
