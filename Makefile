# The two commands a newcomer needs: `make demo` (the local demo) and `make test` (every check and
# test; `.ci/run` runs exactly this). Heavy things are cached outside the checkout, keyed by version:
# the Consul build (scripts/consul.sh), grpc_health_probe, the cargo target dir, Go's module and
# build caches, and the Kubernetes tools.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/consul-registrar
export CARGO_TARGET_DIR ?= $(CACHE_DIR)/target

.PHONY: test demo lint links bins unit-and-integration podsim fuzz consul k8s e2e e2e-local soak bench images schema release

## make test: formatting, lints, unit and integration tests against a real Consul (including the
## pod simulation, which needs root for network namespaces), then the Kubernetes packaging checks,
## then the e2e suite on a kind cluster of three nodes.
test: lint consul unit-and-integration podsim fuzz k8s e2e

lint: links
	cargo fmt --all -- --check
	cargo clippy --all-targets --workspace --locked -- -D warnings

## Every relative link and anchor in the Markdown files resolves (README.md, docs/, the charts',
## deploy/'s and the tests' READMEs), as GitHub resolves them; first, the checker's own tests show
## that it fails on a broken link or anchor. Python 3's standard library only.
links:
	PYTHONDONTWRITEBYTECODE=1 python3 -m unittest discover -s tests/docs
	python3 scripts/check-links.py

## Provides the pinned Consul (built once from its Go module, then cached).
consul:
	@bash scripts/consul.sh >/dev/null

## The binaries the tests run (the sidecar and the demo app), built once before the tests: no test
## starts a cargo build of its own. The tests find them through these two variables.
TEST_BINS = CONSUL_REGISTRAR_BIN="$(CARGO_TARGET_DIR)/debug/consul-registrar" DEMO_APP_BIN="$(CARGO_TARGET_DIR)/debug/demo-app"
bins:
	cargo build --locked --workspace --bins

## The manifest's JSON Schema and what is made from it: docs/manifest.schema.json as
## `consul-registrar schema` prints it (from src/manifest/schema.rs), then the reference tables in
## docs/manifest.md and the manifest part of the chart's values.schema.json. Run it after changing
## a manifest field and commit the result; `make test` fails while they are stale.
schema:
	cargo build --locked --bin consul-registrar
	"$(CARGO_TARGET_DIR)/debug/consul-registrar" schema > docs/manifest.schema.json
	python3 scripts/manifest_schema.py --write

## tests/probe_compat.rs runs the real grpc_health_probe (built once from its Go module) beside `probe`.
## Eight tests at once in each test binary, not one per core: most of their time is spent waiting
## on Consul's session TTLs and the sidecars' timers, not on the CPU.
unit-and-integration: consul bins
	$(TEST_BINS) CONSUL_BIN="$$(bash scripts/consul.sh)" PROMTOOL="$$(bash scripts/promtool.sh)" \
	GRPC_HEALTH_PROBE="$$(bash scripts/grpc-health-probe.sh)" cargo test --locked -- --skip scenario_ --test-threads 8

## The reliability scenarios on the pod simulation, with their figures printed (FIGURE lines). Needs
## root (network namespaces); without root it refuses and names the scenarios it did not run
## (PODSIM_ALLOW_SKIP=1 goes on without them, never under CI=true).
podsim: consul bins
	$(TEST_BINS) bash scripts/podsim.sh

## A bounded fuzzing run (about a minute) of the manifest and duration parsers; fails on a crash.
fuzz:
	bash scripts/fuzz.sh

## Kubernetes packaging: hadolint, shellcheck, helm lint, chart and deploy/ renders validated
## strictly against the Kubernetes schemas, the pod spec read back (no cluster needed).
k8s:
	bash scripts/check-k8s.sh

## The e2e suite (tests/e2e/suite) on a kind cluster of one control plane and two workers, made
## here with nothing pulled (tests/e2e/kind; needs root; Debian's docker.io and debootstrap are
## installed when missing): images built, cluster up, suite, and the cluster always brought down,
## leaving no container, network, engine or firewall change. Prints every scenario's FIGURE lines.
e2e:
	bash tests/e2e/run.sh kind

## The same suite (less the multi-node scenarios) on a single-node Kubernetes built from source and
## run as local processes, no Docker (tests/e2e/cluster/local.sh; needs root). Not in `make test`.
e2e-local:
	bash tests/e2e/run.sh local

## Not part of `make test`: SOAK_ROLLOUTS (20) rolling restarts under 100 RPC/s back to back for each
## of SOAK_VARIANTS (native, classic, abrupt-native), failed RPCs per rollout and a summary
## (tests/e2e/suite/soak.py; about 30 min with the defaults). On the cluster provider of
## E2E_PROVIDER: kind (make e2e's) by default, local, or existing (KUBECONFIG, images loaded).
E2E_PROVIDER ?= kind
soak:
	E2E_TESTS=tests/e2e/suite/soak.py bash tests/e2e/run.sh $(E2E_PROVIDER)

## Container images without Docker (buildah): archives under ~/.cache/consul-registrar/images,
## their paths printed; `kind load image-archive` or `ctr -n k8s.io images import` takes them.
images:
	bash scripts/images.sh

## The release artifacts of Cargo.toml's version in dist/<version>/: the packaged charts and their
## Helm repository index, the image archives (scripts/images.sh), a CycloneDX SBOM of the binary's
## crates, SHA256SUMS (scripts/release.sh; publishing them: docs/releasing.md).
release:
	bash scripts/release.sh

## Benchmarks against Consul's own gRPC check (reports figures; never fails on a slow machine).
bench:
	bash scripts/bench.sh

## make demo: Consul dev agent + demo gRPC app + the sidecar; flips health, Ctrl-C drains.
demo:
	bash scripts/demo.sh
