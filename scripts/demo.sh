#!/usr/bin/env bash
# The local demo: a Consul dev agent, the demo gRPC app and the sidecar with examples/manifest.yaml.
# The demo app flips between SERVING and NOT_SERVING every DEMO_FLIP_SECONDS; the script prints what
# Consul reports for the instance after each flip. Ctrl-C (or DEMO_FLIPS flips) sends SIGTERM to the
# sidecar, which drains and deregisters; the script shows the instance gone and stops everything.
#
# Ports (all on 127.0.0.1) can be moved with CONSUL_PORT, APP_PORT, CONTROL_PORT, ADMIN_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."

CONSUL_PORT="${CONSUL_PORT:-8500}"
APP_PORT="${APP_PORT:-50051}"
CONTROL_PORT="${CONTROL_PORT:-8080}"
ADMIN_PORT="${ADMIN_PORT:-9102}"
DEMO_FLIPS="${DEMO_FLIPS:-0}"            # 0: until Ctrl-C
DEMO_FLIP_SECONDS="${DEMO_FLIP_SECONDS:-5}"

# Bold headings on a terminal only, and not with NO_COLOR (https://no-color.org): a log file or a
# pipe gets plain text.
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
say() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }

consul_bin=$(bash scripts/consul.sh)
# CONSUL_REGISTRAR_BIN and DEMO_APP_BIN name binaries built already (tests/demo.rs passes the ones
# under test, so that no cargo build runs inside a test); otherwise the script builds them.
if [ -n "${CONSUL_REGISTRAR_BIN:-}" ] && [ -n "${DEMO_APP_BIN:-}" ]; then
  registrar="$CONSUL_REGISTRAR_BIN"
  demo_app="$DEMO_APP_BIN"
else
  say "building the sidecar and the demo app (about 3 minutes on 2 cores the first time, seconds after)"
  cargo build --quiet --locked --bin consul-registrar --bin demo-app --workspace
  target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  registrar="$target_dir/debug/consul-registrar"
  demo_app="$target_dir/debug/demo-app"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/consul-registrar-demo.XXXXXX")
pids=()
registrar_pid=""
# shellcheck disable=SC2329 # invoked by the EXIT trap
cleanup() {
  # The sidecar first, so that it can still reach Consul to deregister; then the rest.
  if [ -n "$registrar_pid" ] && kill -TERM "$registrar_pid" 2>/dev/null; then
    wait "$registrar_pid" 2>/dev/null || true
  fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Consul's three internal ports (server RPC, Serf LAN, Serf WAN): free ports below Linux's ephemeral
# range, so no outgoing connection can take one first, distinct from each other and from the four
# ports above, which are chosen already but not yet bound (a Serf port on ADMIN_PORT stopped the
# sidecar with "Address already in use").
consul_ports() {
  python3 - "$CONSUL_PORT" "$APP_PORT" "$CONTROL_PORT" "$ADMIN_PORT" <<'PY'
import random, socket, sys
taken = {int(p) for p in sys.argv[1:]}
chosen = []
for _ in range(10000):
    port = random.randrange(12000, 32000)
    if port in taken:
        continue
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", port))
    except OSError:
        continue
    taken.add(port)
    chosen.append(port)
    if len(chosen) == 3:
        break
print(*chosen)
PY
}
read -r server_port serf_lan_port serf_wan_port < <(consul_ports)

say "starting a Consul dev agent on 127.0.0.1:$CONSUL_PORT"
"$consul_bin" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -node demo \
  -http-port "$CONSUL_PORT" -dns-port -1 -grpc-port -1 -grpc-tls-port -1 \
  -server-port "$server_port" -serf-lan-port "$serf_lan_port" -serf-wan-port "$serf_wan_port" \
  >"$work/consul.log" 2>&1 &
pids+=($!)
consul="http://127.0.0.1:$CONSUL_PORT"
for _ in $(seq 1 100); do
  leader=$(curl -fsS "$consul/v1/status/leader" 2>/dev/null || true)
  [ -n "$leader" ] && [ "$leader" != '""' ] && break
  sleep 0.1
done
[ -n "${leader:-}" ] && [ "$leader" != '""' ] || { cat "$work/consul.log"; echo "Consul did not start" >&2; exit 1; }

say "starting the demo gRPC app on 127.0.0.1:$APP_PORT (control port $CONTROL_PORT)"
"$demo_app" serve --listen "127.0.0.1:$APP_PORT" --control "127.0.0.1:$CONTROL_PORT" \
  --health-service helloworld.Greeter >"$work/app.log" 2>&1 &
pids+=($!)

say "starting consul-registrar with examples/manifest.yaml"
started=$(date +%s.%N)
CONSUL_HTTP_ADDR="$consul" APP_PORT="$APP_PORT" ADMIN_ADDR="127.0.0.1:$ADMIN_PORT" \
  "$registrar" run --manifest examples/manifest.yaml &
registrar_pid=$!

echo
echo "Consul UI:      http://127.0.0.1:$CONSUL_PORT/ui/dc1/services/hello/instances"
echo "Sidecar status: http://127.0.0.1:$ADMIN_PORT/status   metrics: http://127.0.0.1:$ADMIN_PORT/metrics"

consul_view() {
  curl -fsS "$consul/v1/health/service/hello" | python3 -c '
import json, sys
entries = json.load(sys.stdin)
if not entries:
    print("Consul: no instance of hello")
for e in entries:
    instance = e["Service"]["ID"]
    for c in e["Checks"]:
        if c["CheckID"].startswith("consul-registrar:"):
            print("Consul: %s is %s  (%s)" % (instance, c["Status"].upper(), c["Output"]))
'
}

# wait_for_status passing|critical SINCE LIMIT: waits until every consul-registrar check of `hello`
# in Consul has the status (read with a JSON parser) and prints how long after SINCE (epoch seconds:
# the flip) Consul showed it, e.g. "hello-1 → critical in Consul after 0.004 s". Fails after LIMIT
# seconds.
wait_for_status() {
  python3 - "$consul" "$1" "$2" "$3" <<'PY'
import json, sys, time, urllib.request
consul, want, since, limit = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
url = consul + "/v1/health/checks/hello"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
seen = "no answer"
while True:
    try:
        with opener.open(url, timeout=1) as r:
            checks = [c for c in json.load(r) if c["CheckID"].startswith("consul-registrar:")]
        seen = ", ".join("%s %s" % (c["ServiceID"], c["Status"]) for c in checks) or "no check"
        if checks and all(c["Status"] == want for c in checks):
            took = time.time() - since
            for c in checks:
                print("%s → %s in Consul after %.3f s" % (c["ServiceID"], want, took))
            sys.exit(0)
    except (OSError, ValueError, KeyError) as e:
        seen = "error: %s" % e
    if time.time() - since > limit:
        print("Consul did not show %s within %g s (it shows: %s)" % (want, limit, seen), file=sys.stderr)
        sys.exit(1)
    time.sleep(0.005)
PY
}

stop_demo() {
  say "stopping: SIGTERM to the sidecar (drain: critical at once, then deregister after the delay)"
  kill -TERM "$registrar_pid" 2>/dev/null || true
  sleep 0.3
  consul_view
  status=0
  wait "$registrar_pid" || status=$?
  registrar_pid=""
  echo "consul-registrar exited with status $status"
  consul_view
  exit "$status"
}
trap stop_demo INT TERM

# The first registration: the sidecar starts, registers and sees the app SERVING (timed from its start).
wait_for_status passing "$started" 15
say "the app is SERVING"
consul_view
flips=0
serving=true
while [ "$DEMO_FLIPS" = 0 ] || [ "$flips" -lt "$DEMO_FLIPS" ]; do
  sleep "$DEMO_FLIP_SECONDS" &
  wait $! || true
  if $serving; then
    say "flipping the app to NOT_SERVING"
    flipped=$(date +%s.%N)
    curl -fsS -X POST "http://127.0.0.1:$CONTROL_PORT/not-serving" >/dev/null
    serving=false
    wait_for_status critical "$flipped" 5
  else
    say "flipping the app back to SERVING"
    flipped=$(date +%s.%N)
    curl -fsS -X POST "http://127.0.0.1:$CONTROL_PORT/serving" >/dev/null
    serving=true
    wait_for_status passing "$flipped" 5
  fi
  consul_view
  flips=$((flips + 1))
done
stop_demo
