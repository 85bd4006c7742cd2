#!/usr/bin/env bash
# The benchmark suite (`make bench`): builds the sidecar, the demo app and the bench driver once
# (release profile), provides Consul (scripts/consul.sh) and a plotting venv (matplotlib, cached),
# runs examples/bench.rs (which starts its processes with the workspace's test kit, testkit/) against
# a real Consul dev agent on loopback, and draws the latency plot.
#
# Output in $BENCH_OUT (default bench-results/, git-ignored): results.md (the tables),
# results.json (every sample), latency.png, bench.log and logs/ (every process's log).
#
# Knobs (environment):
#   BENCH_PHASES=propagation,footprint,drain,scale,recovery,raft,reap   a subset, for quick runs
#                     (default all)
#   BENCH_QUICK=1     small sample counts and short windows (a smoke run of ~5 minutes, most of it
#                     the reap phase waiting for Consul's agent-mode reaper; the figures are then
#                     rough)
#   BENCH_FLIPS, BENCH_PEER_FLIPS, BENCH_FLOOR_FLIPS, BENCH_DRAIN_RUNS, BENCH_RECOVERY_RUNS,
#   BENCH_IDLE_SECONDS, BENCH_LOAD_SECONDS, BENCH_STEADY_SECONDS, BENCH_SCALE,
#   BENCH_RAFT_INSTANCES, BENCH_RAFT_SECONDS, BENCH_REAP_RUNS, BENCH_PODS,
#   BENCH_PODS_REST_SECONDS, BENCH_POD_EVENTS, BENCH_POD_FLIPS   see `bench --help`
#   (the scale-catalog and scale-agent phases run only when BENCH_PHASES names them)
#
# The figures are reported, never asserted: the script fails only when something could not run
# (no Consul, a build error, Consul did not start, the sidecar never registered, no plot).
set -euo pipefail
cd "$(dirname "$0")/.."

MATPLOTLIB_VERSION=3.10.8
cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
out="${BENCH_OUT:-bench-results}"
log() { printf 'bench.sh: %s\n' "$*" >&2; }

if [ "${BENCH_QUICK:-0}" = 1 ]; then
  export BENCH_FLIPS="${BENCH_FLIPS:-30}" BENCH_PEER_FLIPS="${BENCH_PEER_FLIPS:-5}"
  export BENCH_FLOOR_FLIPS="${BENCH_FLOOR_FLIPS:-20}" BENCH_DRAIN_RUNS="${BENCH_DRAIN_RUNS:-5}"
  export BENCH_RECOVERY_RUNS="${BENCH_RECOVERY_RUNS:-2}" BENCH_IDLE_SECONDS="${BENCH_IDLE_SECONDS:-10}"
  export BENCH_LOAD_SECONDS="${BENCH_LOAD_SECONDS:-5}" BENCH_STEADY_SECONDS="${BENCH_STEADY_SECONDS:-10}"
  export BENCH_SCALE="${BENCH_SCALE:-1,100}" BENCH_RAFT_INSTANCES="${BENCH_RAFT_INSTANCES:-10}"
  export BENCH_RAFT_SECONDS="${BENCH_RAFT_SECONDS:-30}" BENCH_REAP_RUNS="${BENCH_REAP_RUNS:-1}"
fi

consul_bin=$(bash scripts/consul.sh)

# The plotting environment first, so that a missing package fails before a long run.
venv="$cache_root/bench-venv/matplotlib-$MATPLOTLIB_VERSION"
mkdir -p "$(dirname "$venv")"
(
  flock 9
  if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    log "creating the plotting venv $venv (once)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "matplotlib==$MATPLOTLIB_VERSION"
  fi
) 9>"$venv.lock"

log "building the sidecar, the demo app and the bench driver (release profile)"
cargo build --release --locked --workspace --bin consul-registrar --bin demo-app --example bench
target_dir=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
release="$target_dir/release"

mkdir -p "$out"
rm -rf "$out/logs" "$out/results.json" "$out/results.md" "$out/latency.png"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
# Only what goes into the measured binaries counts as a local change.
git diff --quiet HEAD -- src examples demo-app testkit Cargo.toml Cargo.lock 2>/dev/null ||
  commit="$commit+local changes"

log "running; results go to $out/"
"$release/examples/bench" \
  --consul "$consul_bin" \
  --registrar "$release/consul-registrar" \
  --demo-app "$release/demo-app" \
  --out "$out" \
  --commit "$commit" \
  --rustc "$(rustc --version)" 2>&1 | tee "$out/bench.log"

log "drawing $out/latency.png"
"$venv/bin/python" - "$out/results.json" "$out/latency.png" <<'PY'
"""Latency distributions from results.json: propagation (us, Consul alone, Consul's own gRPC check)
as cumulative distributions on a log scale, our own flips as a histogram, drain and recovery."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
prop = results.get("propagation") or {}


def samples(node):
    s = (node or {}).get("samples_ms") or {}
    if isinstance(s, list):
        return sorted(s)
    return sorted(s.get("to_critical", []) + s.get("to_passing", []))


def ecdf(ax, xs, label, **kw):
    if not xs:
        return
    n = len(xs)
    ax.step(xs, [(i + 1) / n for i in range(n)], where="post", label=label, **kw)


fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.5, 1, 1]})
machine = results.get("machine", {})
fig.suptitle(
    "consul-registrar benchmarks — %s × %s, %s; %s"
    % (
        machine.get("cores", "?"),
        machine.get("cpu", "?"),
        results.get("versions", {}).get("consul", ""),
        results.get("versions", {}).get("commit", ""),
    ),
    fontsize=11,
)

ax = axes[0]
us = samples(prop.get("us"))
ecdf(ax, us, "consul-registrar, agent mode (n=%d)" % len(us), color="tab:blue", linewidth=2)
cat = samples(prop.get("catalog"))
ecdf(ax, cat, "consul-registrar, catalog mode (n=%d)" % len(cat), color="tab:green", linewidth=2)
floor = samples(prop.get("floor"))
ecdf(ax, floor, "Consul alone: TTL update → catalog (n=%d)" % len(floor), color="tab:gray")
peer = samples(prop.get("peer_1s"))
ecdf(ax, peer, "Consul's GRPC check, interval 1 s (n=%d)" % len(peer), color="tab:red")
p10 = prop.get("peer_10s") or {}
if p10.get("fixed_cost_ms") is not None:
    c = p10["fixed_cost_ms"]
    xs = [max(1.0, c + 10000.0 * i / 200) for i in range(201)]
    ax.plot(xs, [i / 200 for i in range(201)], "--", color="tab:orange",
            label="Consul's GRPC check, interval 10 s (computed)")
ax.axvline(10, color="tab:green", linestyle=":", linewidth=1)
ax.text(10, 0.02, " 10 ms target", color="tab:green", fontsize=8)
ax.set_xscale("log")
ax.set_xlabel("app flips health → /v1/health/service shows it (ms, log scale)")
ax.set_ylabel("fraction of flips")
ratio = prop.get("ratio_p50_peer_1s_over_us")
ax.set_title("Propagation latency" + (" — p50 ratio 1 s check / us: %.0f×" % ratio if ratio else ""))
ax.grid(True, which="both", alpha=0.3)
if us or cat or peer or floor:
    ax.legend(loc="center left", bbox_to_anchor=(0.16, 0.5), fontsize=8)
else:
    ax.text(0.5, 0.5, "propagation not run", transform=ax.transAxes, ha="center")

ax = axes[1]
s = (prop.get("us") or {}).get("samples_ms") or {}
crit, pas = s.get("to_critical", []), s.get("to_passing", [])
if crit or pas:
    hi = max(crit + pas)
    bins = [hi * i / 40 for i in range(41)]
    ax.hist([crit, pas], bins=bins, label=["to critical", "to passing"],
            color=["tab:purple", "tab:cyan"], stacked=True)
    summ = prop["us"]["all"]
    for q, style in (("p50", "-"), ("p99", "--")):
        ax.axvline(summ[q], color="black", linestyle=style, linewidth=1)
        ax.text(summ[q], ax.get_ylim()[1] * 0.92, " %s %.1f ms" % (q, summ[q]), fontsize=8)
    ax.legend(fontsize=8)
else:
    ax.text(0.5, 0.5, "propagation not run", transform=ax.transAxes, ha="center")
ax.set_xlabel("ms")
ax.set_ylabel("flips")
ax.set_title("consul-registrar propagation, by direction")

ax = axes[2]
groups = []
drain = samples(results.get("drain"))
if drain:
    groups.append(("drain (delay 0)\nSIGTERM → gone", drain))
startup = sorted((results.get("drain") or {}).get("startup_samples_ms", []))
if startup:
    groups.append(("start-up\nspawn → passing", startup))
rec = samples(results.get("recovery"))
if rec:
    groups.append(("recovery\nConsul up → passing", rec))
reap = results.get("reap") or {}
for mode in ("agent", "catalog"):
    gone = sorted((reap.get(mode) or {}).get("gone_samples_ms", []))
    if gone:
        groups.append(("reap, %s\nKILL → gone" % mode, gone))
if groups:
    ax.boxplot([g[1] for g in groups], whis=(0, 100), widths=0.5)
    for i, (_, g) in enumerate(groups, start=1):
        ax.plot([i + (k % 7 - 3) * 0.03 for k in range(len(g))], g, ".", alpha=0.5, color="tab:blue")
    ax.set_xticks(range(1, len(groups) + 1), [g[0] for g in groups],
                  fontsize=8 if len(groups) <= 3 else 6.5)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
else:
    ax.text(0.5, 0.5, "drain and recovery not run", transform=ax.transAxes, ha="center")
ax.set_title("Drain, start-up, recovery, reap (each run)")
ax.grid(True, which="both", axis="y", alpha=0.3)

fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
PY
log "done: $out/results.md, $out/results.json, $out/latency.png"
