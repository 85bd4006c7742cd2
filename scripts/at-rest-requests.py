"""Catalog mode's Consul requests at rest, per operation (docs/benchmarks.md, issue 20): N (20)
one-instance sidecars of one service on one virtual node against a Consul -dev server, the
sidecars' consul_registrar_consul_requests_total over STEADY (180) seconds after WARM (60) of
warm-up; prints requests per pod per minute by operation, as JSON. SHARED=1 gives the sidecars
`consul.catalog.sharedSession` (one session for the virtual node).

    make bins && CONSUL_BIN="$(bash scripts/consul.sh)" python3 scripts/at-rest-requests.py

Binaries: CONSUL_REGISTRAR_BIN and DEMO_APP_BIN (default: $CARGO_TARGET_DIR/debug, else
target/debug), CONSUL_BIN. Ports 18900-18903, 18950 and 19300 + i on 127.0.0.1.
"""
import json, os, re, subprocess, tempfile, time, urllib.request
_target = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "debug")
REGISTRAR = os.environ.get("CONSUL_REGISTRAR_BIN", os.path.join(_target, "consul-registrar"))
DEMO_APP = os.environ.get("DEMO_APP_BIN", os.path.join(_target, "demo-app"))
CONSUL = os.environ["CONSUL_BIN"]
SHARED = os.environ.get("SHARED") == "1"
N = int(os.environ.get("N", "20")); WARM = int(os.environ.get("WARM", "60")); STEADY = int(os.environ.get("STEADY", "180"))
d = tempfile.mkdtemp()
procs = []
def spawn(cmd, env=None, log="x"):
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=open(f"{d}/{log}.log", "w"), stderr=subprocess.STDOUT)
    procs.append(p); return p
try:
    spawn([CONSUL, "agent", "-dev", "-http-port", "18900", "-grpc-port", "-1", "-dns-port", "-1", "-serf-lan-port", "18901",
           "-serf-wan-port", "18902", "-server-port", "18903", "-hcl", "limits { http_max_conns_per_client = 1000 }", "-log-level", "warn"], log="consul")
    spawn([DEMO_APP, "serve", "--listen", "127.0.0.1:18950"], log="app")
    time.sleep(4)
    for i in range(N):
        m = f"""consul:
  address: 127.0.0.1:18900
  mode: catalog
""" + (f"""  catalog:
    sharedSession:
      advertise: 127.0.0.1:{19300+i}
""" if SHARED else "") + f"""services:
  - name: hello
    id: hello-{i}
    address: 127.0.0.1
    port: 18950
    health:
      service: helloworld.Greeter
"""
        open(f"{d}/m{i}.yaml", "w").write(m)
        spawn([REGISTRAR, "run", "--manifest", f"{d}/m{i}.yaml", "--admin-addr", f"127.0.0.1:{19300+i}", "--log-level", "warn"],
              env={"NODE_NAME": "kube-a", "HOST_IP": "127.0.0.1", "HOSTNAME": f"pod-{i}"}, log=f"s{i}")
    time.sleep(WARM)
    def scrape():
        tot = {}
        for i in range(N):
            body = urllib.request.urlopen(f"http://127.0.0.1:{19300+i}/metrics", timeout=5).read().decode()
            for line in body.splitlines():
                mm = re.match(r'consul_registrar_consul_requests_total\{(.*)\} (\S+)', line)
                if mm:
                    op = re.search(r'operation="([^"]+)"', mm.group(1)).group(1)
                    tot[op] = tot.get(op, 0) + float(mm.group(2))
        return tot
    a = scrape(); time.sleep(STEADY); b = scrape()
    rates = {op: (b.get(op, 0) - a.get(op, 0)) / N / (STEADY / 60) for op in sorted(set(a) | set(b))}
    rates = {k: round(v, 2) for k, v in rates.items() if v}
    print(json.dumps({"pods": N, "shared_session": SHARED, "steady_s": STEADY, "per_pod_per_min": rates, "total": round(sum(rates.values()), 2)}, indent=1))
finally:
    for p in procs: p.terminate()
    time.sleep(1)
    for p in procs: p.kill()
