# The two commands a newcomer needs: `make demo` (the local demo) and `make test` (every check and
# test; `.ci/run` runs exactly this). Heavy things are cached outside the checkout, keyed by version:
# the Consul build (scripts/consul.sh), the cargo target dir, and the Kubernetes tools.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/consul-registrar
export CARGO_TARGET_DIR ?= $(CACHE_DIR)/target

.PHONY: test demo lint bins unit-and-integration podsim fuzz consul k8s e2e-kind bench

## make test: formatting, lints, unit and integration tests against a real Consul (including the
## pod simulation, which needs root for network namespaces), then the Kubernetes packaging checks.
test: lint consul unit-and-integration podsim fuzz k8s

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

unit-and-integration: consul bins
	$(TEST_BINS) CONSUL_BIN="$$(bash scripts/consul.sh)" PROMTOOL="$$(bash scripts/promtool.sh)" cargo test --locked -- --skip scenario_

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

## The kind e2e suite (needs docker, kind, kubectl, helm; skips with a message without them).
e2e-kind:
	bash tests/e2e/kind/run.sh

## Benchmarks against Consul's own gRPC check (reports figures; never fails on a slow machine).
bench:
	bash scripts/bench.sh

## make demo: Consul dev agent + demo gRPC app + the sidecar; flips health, Ctrl-C drains.
demo:
	bash scripts/demo.sh
