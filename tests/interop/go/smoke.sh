#!/usr/bin/env bash
# End-to-end smoke test of the Go peers on loopback only: a Consul dev agent, two hello-servers
# ("a" and "b") registered as `hello` with a TTL check (driven by this script) and a GRPC check
# (Consul probing the server's standard health service every second), and hello-client traffic.
#
#   1. both passing: the client's traffic reaches both backends, with no failed RPC;
#   2. b's TTL check failed: the client stops sending to b (figure: seconds after the fail);
#   3. a set NOT_SERVING by SIGUSR1, then SERVING by SIGUSR2: the GRPC check follows and the
#      client leaves a, then comes back to it (figures: seconds after each signal);
#   4. the HTTP control port toggles health; SIGTERM stops each server with exit status 0.
#
# Usage: bash tests/interop/go/smoke.sh   (needs curl, jq, python3; about 30 s; prints figures)
set -euo pipefail

root="$(cd "$(dirname "$0")/../../.." && pwd)"
consul_bin=$(bash "$root/scripts/consul.sh")
peers=$(bash "$root/scripts/go-peers.sh")
work=$(mktemp -d "${TMPDIR:-/tmp}/go-peers-smoke.XXXXXX")
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

log() { printf 'smoke: %s\n' "$*" >&2; }
fails=0
passes=0
check() { # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then
    passes=$((passes + 1))
    log "ok: $what"
  else
    fails=$((fails + 1))
    log "FAILED: $what"
  fi
}

# Eight free loopback ports, chosen at once so they differ.
read -r http serf_lan serf_wan server grpc_a grpc_b ctl_a ctl_b < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
PY
)
consul="127.0.0.1:$http"
api() { curl -fsS -X "$1" "http://$consul$2" "${@:3}"; }

"$consul_bin" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$http" -dns-port -1 \
  -grpc-port -1 -grpc-tls-port -1 -serf-lan-port "$serf_lan" -serf-wan-port "$serf_wan" \
  -server-port "$server" -data-dir "$work/consul" >"$work/consul.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  [ "$(api GET /v1/status/leader 2>/dev/null || true)" = "\"127.0.0.1:$server\"" ] && break
  sleep 0.1
done
api GET /v1/status/leader >/dev/null || { cat "$work/consul.log" >&2; exit 1; }
log "Consul dev agent at $consul"

start_server() { # start_server TAG GRPC_PORT CONTROL_PORT
  "$peers/hello-server" -listen "127.0.0.1:$2" -name "$1" -control "127.0.0.1:$3" >"$work/$1.out" 2>"$work/$1.log" &
  pids+=($!)
  eval "pid_$1=$!"
  for _ in $(seq 50); do
    grep -q "^hello-server listening on 127.0.0.1:$2\$" "$work/$1.out" && return 0
    sleep 0.1
  done
  cat "$work/$1.log" >&2
  return 1
}
start_server a "$grpc_a" "$ctl_a"
start_server b "$grpc_b" "$ctl_b"

register() { # register TAG PORT
  api PUT /v1/agent/service/register --data @- <<JSON
{"ID": "hello-$1", "Name": "hello", "Address": "127.0.0.1", "Port": $2,
 "Checks": [{"CheckID": "hello-$1-ttl", "Name": "ttl", "TTL": "120s"},
            {"CheckID": "hello-$1-grpc", "Name": "grpc", "GRPC": "127.0.0.1:$2",
             "GRPCUseTLS": false, "Interval": "1s", "Timeout": "1s"}]}
JSON
  api PUT "/v1/agent/check/pass/hello-$1-ttl" >/dev/null
}
register a "$grpc_a"
register b "$grpc_b"
passing() { api GET "/v1/health/service/hello?passing=true" | jq -r '[.[].Service.ID] | sort | join(",")'; }
wait_passing() { # wait_passing "hello-a,hello-b"
  for _ in $(seq 100); do
    [ "$(passing)" = "$1" ] && return 0
    sleep 0.1
  done
  return 1
}
check "both instances passing in Consul" wait_passing "hello-a,hello-b"

client() { # client DURATION REPORT [more flags]
  "$peers/hello-client" -consul "$consul" -service hello -rate 200 -timeout 1s -duration "$1" -out "$2" "${@:3}"
}
field() { jq -r "$2" "$1"; }

# 1. Steady traffic over both backends.
client 4s "$work/r1.json" 2>"$work/c1.log"
log "phase 1 report: $(jq -c . "$work/r1.json")"
check "phase 1: no failed RPC" [ "$(field "$work/r1.json" .failed)" = 0 ]
check "phase 1: at least 700 RPCs in 4 s" [ "$(field "$work/r1.json" .sent)" -ge 700 ]
check "phase 1: both backends served" [ "$(field "$work/r1.json" '[.by_backend.a // 0, .by_backend.b // 0] | min')" -gt 0 ]

# The progress lines carry a Unix time and per-backend counts every 100 ms. last_gain prints the
# time of the last line at which TAG's count grew, first_gain_after the first growth after T.
last_gain() { # last_gain LOG TAG
  awk -v tag="$2" '{
    n = 0; u = ""
    for (i = 1; i <= NF; i++) {
      if ($i ~ "^unix=") u = substr($i, 6)
      if ($i ~ "^(by_backend=\\{)?" tag "=") { v = $i; sub(".*" tag "=", "", v); sub("}", "", v); n = v + 0 }
    }
    if (u != "" && n > prev) { last = u; prev = n }
  } END { print last }' "$1"
}
first_gain_after() { # first_gain_after LOG TAG T
  awk -v tag="$2" -v t="$3" '{
    n = 0; u = ""
    for (i = 1; i <= NF; i++) {
      if ($i ~ "^unix=") u = substr($i, 6)
      if ($i ~ "^(by_backend=\\{)?" tag "=") { v = $i; sub(".*" tag "=", "", v); sub("}", "", v); n = v + 0 }
    }
    if (u == "") next
    if (u + 0 > t + 0 && n > prev && !found) { print u; found = 1 }
    prev = n
  }' "$1"
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# 2. b's TTL check fails mid-traffic: the client must leave b within about a second.
client 6s "$work/r2.json" -report-every 100ms 2>"$work/c2.log" &
c2=$!
pids+=("$c2")
sleep 2.5
t_fail=$(now)
api PUT /v1/agent/check/fail/hello-b-ttl >/dev/null
wait "$c2"
log "phase 2 report: $(jq -c . "$work/r2.json")"
b_last=$(last_gain "$work/c2.log" b)
leave_b=$(secs "$t_fail" "${b_last:-0}")
log "phase 2: last RPC to b seen $leave_b s after its check failed (progress lines every 100 ms)"
check "phase 2: no failed RPC" [ "$(field "$work/r2.json" .failed)" = 0 ]
check "phase 2: b served before the fail" [ -n "$b_last" ]
check "phase 2: the client left b within 1.2 s" awk -v s="$leave_b" 'BEGIN { exit !(s < 1.2) }'
check "phase 2: a kept serving after b left" [ "$(last_gain "$work/c2.log" a)" \> "$b_last" ]

# 3. SIGUSR1 → NOT_SERVING, seen by Consul's GRPC check; SIGUSR2 → SERVING again.
api PUT /v1/agent/check/pass/hello-b-ttl >/dev/null
check "phase 3: both passing again" wait_passing "hello-a,hello-b"
client 9s "$work/r3.json" -report-every 100ms 2>"$work/c3.log" &
c3=$!
pids+=("$c3")
sleep 2
t_usr1=$(now)
# shellcheck disable=SC2154 # pid_a is set by start_server through eval
kill -USR1 "$pid_a"
sleep 3.5
t_usr2=$(now)
kill -USR2 "$pid_a"
wait "$c3"
log "phase 3 report: $(jq -c . "$work/r3.json")"
a_left=$(awk -v t="$t_usr2" '{
  u = ""; n = 0
  for (i = 1; i <= NF; i++) {
    if ($i ~ "^unix=") u = substr($i, 6)
    if ($i ~ "^(by_backend=\\{)?a=") { v = $i; sub(".*a=", "", v); sub("}", "", v); n = v + 0 }
  }
  if (u != "" && u + 0 < t + 0 && n > prev) { last = u; prev = n }
} END { print last }' "$work/c3.log")
a_back=$(first_gain_after "$work/c3.log" a "$t_usr2")
leave_a=$(secs "$t_usr1" "${a_left:-0}")
back_a=$(secs "$t_usr2" "${a_back:-0}")
log "phase 3: last RPC to a $leave_a s after SIGUSR1; first RPC to a again $back_a s after SIGUSR2 (GRPC check interval 1 s)"
check "phase 3: no failed RPC" [ "$(field "$work/r3.json" .failed)" = 0 ]
check "phase 3: the client left a within 2.2 s of SIGUSR1" awk -v s="$leave_a" 'BEGIN { exit !(s > 0 && s < 2.2) }'
check "phase 3: the client came back to a within 2.2 s of SIGUSR2" awk -v s="$back_a" -v t="${a_back:-}" 'BEGIN { exit !(t != "" && s < 2.2) }'

# 4. The control port, then SIGTERM.
check "control: POST /not-serving" [ "$(curl -fsS -X POST "http://127.0.0.1:$ctl_b/not-serving")" = NOT_SERVING ]
check "control: b's GRPC check turns critical" wait_passing "hello-a"
check "control: POST /serving" [ "$(curl -fsS -X POST "http://127.0.0.1:$ctl_b/serving")" = SERVING ]
check "control: b's GRPC check passes again" wait_passing "hello-a,hello-b"
for tag in a b; do
  pid_var="pid_$tag"
  t0=$(now)
  kill -TERM "${!pid_var}"
  rc=0
  wait "${!pid_var}" || rc=$?
  log "SIGTERM: $tag exited with status $rc after $(secs "$t0" "$(now)") s"
  check "SIGTERM: $tag exits 0" [ "$rc" = 0 ]
done

printf '%s passed, %s failed\n' "$passes" "$fails"
[ "$fails" = 0 ]
