# The two commands a newcomer needs: `make demo` (the local demo) and `make test` (every check and
# test; `.ci/run` runs exactly this). Heavy things are cached outside the checkout, keyed by version:
# the Consul build (scripts/consul.sh), grpc_health_probe, the cargo target dir, Go's module and
# build caches, and the Kubernetes tools.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/consul-registrar
export CARGO_TARGET_DIR ?= $(CACHE_DIR)/target

.PHONY: test demo lint unit-and-integration podsim fuzz consul k8s e2e-kind bench

## make test: formatting, lints, unit and integration tests against a real Consul (including the
## pod simulation, which needs root for network namespaces), then the Kubernetes packaging checks.
test: lint consul unit-and-integration podsim fuzz k8s

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --locked -- -D warnings

## Provides the pinned Consul (built once from its Go module, then cached).
consul:
	@bash scripts/consul.sh >/dev/null

## tests/probe_compat.rs runs the real grpc_health_probe (built once from its Go module) beside `probe`.
unit-and-integration: consul
	CONSUL_BIN="$$(bash scripts/consul.sh)" PROMTOOL="$$(bash scripts/promtool.sh)" \
	GRPC_HEALTH_PROBE="$$(bash scripts/grpc-health-probe.sh)" cargo test --locked -- --skip scenario_

## The reliability scenarios on the pod simulation, with their figures printed (FIGURE lines).
podsim: consul
	CONSUL_BIN="$$(bash scripts/consul.sh)" cargo test --locked --test podsim -- --nocapture --test-threads 8

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
