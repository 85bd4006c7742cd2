# The two commands a newcomer needs: `make demo` (the local demo) and `make test` (every check and
# test; `.ci/run` runs exactly this). Heavy things are cached outside the checkout, keyed by version:
# the Consul build (scripts/consul.sh), the cargo target dir, and the Kubernetes tools.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/consul-registrar
export CARGO_TARGET_DIR ?= $(CACHE_DIR)/target

.PHONY: test demo lint unit-and-integration consul

## make test: formatting, lints, unit and integration tests against a real Consul, chart checks.
test: lint consul unit-and-integration

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --locked -- -D warnings

## Provides the pinned Consul (built once from its Go module, then cached).
consul:
	@bash scripts/consul.sh >/dev/null

unit-and-integration: consul
	CONSUL_BIN="$$(bash scripts/consul.sh)" PROMTOOL="$$(bash scripts/promtool.sh)" cargo test --locked

## make demo: Consul dev agent + demo gRPC app + the sidecar; flips health, Ctrl-C drains.
demo:
	bash scripts/demo.sh
