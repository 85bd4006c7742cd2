# The two commands a newcomer needs: `make demo` (the local demo) and `make test` (every check and
# test; `.ci/run` runs exactly this). Heavy things are cached outside the checkout, keyed by version:
# the Consul build (scripts/consul.sh), grpc_health_probe, the cargo target dir, Go's module and
# build caches, and the Kubernetes tools.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/consul-registrar
export CARGO_TARGET_DIR ?= $(CACHE_DIR)/target

.PHONY: test demo lint bins unit-and-integration podsim fuzz consul k8s e2e e2e-kind bench images

## make test: formatting, lints, unit and integration tests against a real Consul (including the
## pod simulation, which needs root for network namespaces), then the Kubernetes packaging checks,
## then the e2e suite on a real single-node Kubernetes.
test: lint consul unit-and-integration podsim fuzz k8s e2e

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --workspace --locked -- -D warnings

## Provides the pinned Consul (built once from its Go module, then cached).
consul:
	@bash scripts/consul.sh >/dev/null

## The binaries the tests run (the sidecar and the demo app), built once before the tests: no test
## starts a cargo build of its own. The tests find them through these two variables.
TEST_BINS = CONSUL_REGISTRAR_BIN="$(CARGO_TARGET_DIR)/debug/consul-registrar" DEMO_APP_BIN="$(CARGO_TARGET_DIR)/debug/demo-app"
bins:
	cargo build --locked --workspace --bins

## tests/probe_compat.rs runs the real grpc_health_probe (built once from its Go module) beside `probe`.
unit-and-integration: consul bins
	$(TEST_BINS) CONSUL_BIN="$$(bash scripts/consul.sh)" PROMTOOL="$$(bash scripts/promtool.sh)" \
	GRPC_HEALTH_PROBE="$$(bash scripts/grpc-health-probe.sh)" cargo test --locked -- --skip scenario_

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

## The e2e suite (tests/e2e/suite) on a real single-node Kubernetes built from source and run as
## local processes (tests/e2e/cluster/local.sh; needs root): images built, cluster up, suite, and
## the cluster always brought down. Prints every scenario's FIGURE lines.
e2e:
	bash tests/e2e/run.sh local

## The same suite on a kind cluster (needs docker and kind; skips with a message without them).
e2e-kind:
	bash tests/e2e/run.sh kind

## Container images without Docker (buildah): archives under ~/.cache/consul-registrar/images,
## their paths printed; `kind load image-archive` or `ctr -n k8s.io images import` takes them.
images:
	bash scripts/images.sh

## Benchmarks against Consul's own gRPC check (reports figures; never fails on a slow machine).
bench:
	bash scripts/bench.sh

## make demo: Consul dev agent + demo gRPC app + the sidecar; flips health, Ctrl-C drains.
demo:
	bash scripts/demo.sh
