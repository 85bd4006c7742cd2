"""Fixtures of the e2e suite: consul-registrar on a real Kubernetes cluster, judged through Consul's
HTTP API. The suite runs against whatever cluster KUBECONFIG names; providers (tests/e2e/run.sh
with tests/e2e/cluster/local.sh or tests/e2e/kind/cluster.sh) only provision it and load images.

- `kube`: kubectl (KUBECTL, default `kubectl`) with waits that have deadlines;
- `helm`: helm (HELM_BIN, default `helm`) installing charts/consul-registrar with
  tests/e2e/values.yaml (the chart's default Consul address, the node-local agent);
- `consul`: deploy/consul-dev applied (dev server + a client agent on every node), read through a
  `kubectl port-forward` to the server's Service (restarted if it drops);
- `consul_servers`: deploy/consul-dev/servers-only applied (three servers behind the Service
  `consul-server`, no client agent: consul-k8s's agentless layout), read the same way, for the
  catalog-mode scenarios (test_catalog.py);
- `demo`: a factory that installs the chart in a namespace of the test's own with a service name of
  its own, and removes both (and waits until Consul holds none of its instances) afterwards;
- `figure(name, value, unit)`: prints `FIGURE name=value unit` at once and again in the summary;
- `artifacts`: the run's directory for what a scenario keeps for a look afterwards (the rollouts'
  timelines and pod logs, see timeline.py).

Environment: KUBECONFIG (required), KUBECTL, HELM_BIN, E2E_KILL_CONTAINER (a command that SIGKILLs
a container given its bare runtime id, appended; set by tests/e2e/run.sh; without it the
sidecar-kill scenario fails under CI=true and skips otherwise), E2E_STOP_CONTAINER (the same with
SIGSTOP, for the frozen agent of test_hardening.py; set by run.sh for the local provider).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "consul-registrar"
VALUES = REPO / "tests" / "e2e" / "values.yaml"
CONSUL_DEV = REPO / "deploy" / "consul-dev"
CONSUL_SERVERS_ONLY = CONSUL_DEV / "servers-only"
IN_CI = os.environ.get("CI") == "true"
# The multi-node scenarios (test_nodes.py) need two workers: the kind provider's cluster has them
# (its `env` says E2E_WORKERS=2); on a one-node provider (local) they are not collected at all,
# rather than collected and skipped.
MULTI_NODE = int(os.environ.get("E2E_WORKERS", "1")) >= 2
collect_ignore = [] if MULTI_NODE else ["test_nodes.py"]

_FIGURES: list[str] = []


def figure(name: str, value, unit: str) -> None:
    """Prints a scenario's figure as `FIGURE name=value unit` (also repeated in the summary)."""
    if isinstance(value, float):
        value = f"{value:.2f}"
    line = f"FIGURE {name}={value} {unit}"
    _FIGURES.append(line)
    print(line, flush=True)


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


def log(message: str) -> None:
    print(f"e2e: {message}", flush=True)


def wait_for(what: str, condition: Callable[[], object], timeout: float, interval: float = 0.25):
    """Polls `condition` until it returns something truthy (returned); fails after `timeout` s.
    An exception inside `condition` counts as "not yet" (the last one is reported)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = condition()
            if result:
                return result
        except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as e:
            last_error = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for: {what}{detail}")
        time.sleep(interval)


# ---- kubectl ------------------------------------------------------------------------------------


class CommandFailed(subprocess.CalledProcessError):
    """A kubectl or helm command that failed, its stderr in the message (a plain
    CalledProcessError names only the command and the exit status, not the cause)."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or '').strip()}"


class Kube:
    def __init__(self) -> None:
        self.bin = os.environ.get("KUBECTL", "kubectl")

    def run(self, *args: str, input: str | None = None, timeout: float = 120, check: bool = True) -> str:
        proc = subprocess.run([self.bin, *args], input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise CommandFailed(proc.returncode, [self.bin, *args], proc.stdout, proc.stderr)
        return proc.stdout

    def json(self, *args: str, timeout: float = 60):
        return json.loads(self.run(*args, "-o", "json", timeout=timeout))

    def apply(self, manifest: dict | list, namespace: str | None = None) -> None:
        docs = manifest if isinstance(manifest, list) else [manifest]
        ns = ["-n", namespace] if namespace else []
        self.run("apply", *ns, "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))

    def pods(self, namespace: str, selector: str) -> list[dict]:
        """The pods of the selector that are not being deleted, oldest first."""
        items = self.json("-n", namespace, "get", "pods", "-l", selector)["items"]
        items = [p for p in items if not p["metadata"].get("deletionTimestamp")]
        return sorted(items, key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))

    def pod(self, namespace: str, name: str) -> dict | None:
        out = self.run("-n", namespace, "get", "pod", name, "-o", "json", "--ignore-not-found")
        return json.loads(out) if out.strip() else None

    def logs(self, namespace: str, pod: str, container: str, previous: bool = False) -> str:
        args = ["-n", namespace, "logs", pod, "-c", container]
        if previous:
            args.append("--previous")
        return self.run(*args, check=False)

    def exec(self, namespace: str, pod: str, container: str, *command: str, check: bool = True) -> str:
        return self.run("-n", namespace, "exec", pod, "-c", container, "--", *command, check=check, timeout=30)

    def create_namespace(self, name: str) -> None:
        self.run("delete", "namespace", name, "--ignore-not-found", "--wait=true", timeout=180)
        self.run("create", "namespace", name)

    def delete_namespace(self, name: str, wait: bool = True) -> None:
        self.run("delete", "namespace", name, "--ignore-not-found", f"--wait={str(wait).lower()}", timeout=180,
                 check=False)


def container_status(pod: dict | None, name: str) -> dict | None:
    if not pod:
        return None
    status = pod.get("status", {})
    for c in status.get("containerStatuses", []) + status.get("initContainerStatuses", []):
        if c["name"] == name:
            return c
    return None


def container_state(pod: dict | None, name: str) -> str:
    """`running`, `terminated`, `waiting` or `gone` (no pod, or no such container status)."""
    status = container_status(pod, name)
    if not status:
        return "gone"
    state = status.get("state", {})
    for key in ("running", "terminated", "waiting"):
        if key in state:
            return key
    return "waiting"


def serves_while_draining(victim: str, iid: str, app_state: Callable[[], str], app_serves: Callable[[], bool],
                          instance_status: Callable[[], str | None]) -> None:
    """Just after the instance `iid` turned critical (its drain began): the app still runs and serves.
    The drain's delay (3 s) is the time to look, and a look (two kubectl calls) can take most of it
    on a loaded machine; a look that came after the deregistration may find the app stopping. So
    the app is read first and Consul after: either the app served, or Consul no longer had the
    instance (what the drain guarantees: deregistered, then the app stopped)."""
    state = app_state()
    serving = state == "running" and app_serves()
    status = instance_status()
    assert serving or status is None, \
        f"the app of {victim} ({state}) did not serve while Consul still had {iid} ({status})"
    if not serving:
        log(f"{victim}: looked after the deregistration (the app {state}, not serving); not a failure")


def deregistered_before_app_stops(victim: str, iid: str, app_state: Callable[[], str],
                                  instance_status: Callable[[], str | None],
                                  within: float = 40) -> tuple[float, float]:
    """Follows a deleted pod until its app container stops, asserting that the instance `iid` is
    gone from Consul by then (the preStop drain). `app_state()` gives the container's state (see
    `container_state`), `instance_status()` the instance's status or None once it is gone. Returns
    when the instance was first seen gone and when the app was seen stopped (time.monotonic())."""
    gone_at = None
    deadline = time.monotonic() + within
    while True:
        # The container's state first, Consul afterwards: whenever the app is seen stopped, an
        # instance read later must already be gone.
        state = app_state()
        try:
            status = instance_status()
        except OSError:
            assert time.monotonic() < deadline, "Consul did not answer"
            continue
        now = time.monotonic()
        if status is None and gone_at is None:
            gone_at = now
        if state != "running":
            assert status is None, f"the app container of {victim} is {state} but Consul still has {iid} ({status})"
            break
        assert now < deadline, f"{victim}'s app did not stop within {within:.0f} s (instance: {status or 'gone'})"
        time.sleep(0.1)
    assert gone_at is not None
    return gone_at, time.monotonic()


@pytest.fixture(scope="session")
def kube() -> Kube:
    if not os.environ.get("KUBECONFIG"):
        pytest.fail("KUBECONFIG is not set: run the suite through tests/e2e/run.sh PROVIDER, or point it at a cluster")
    k = Kube()
    try:
        version = k.json("version")
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"the cluster of KUBECONFIG={os.environ['KUBECONFIG']} does not answer: {e}")
    log(f"kubectl {version['clientVersion']['gitVersion']}, server {version['serverVersion']['gitVersion']}")
    return k


# ---- helm ---------------------------------------------------------------------------------------


class Helm:
    def __init__(self, work: Path) -> None:
        self.bin = os.environ.get("HELM_BIN", "helm")
        self.work = work
        self.env = dict(os.environ)
        for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
            self.env.setdefault(var, str(work / "helm" / sub))

    def run(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run([self.bin, *args], capture_output=True, text=True, timeout=timeout, env=self.env)
        if proc.returncode != 0:
            raise CommandFailed(proc.returncode, [self.bin, *args], proc.stdout, proc.stderr)
        return proc.stdout

    def install(self, release: str, namespace: str, values: dict, wait: bool = True) -> None:
        """`helm install` of the chart with tests/e2e/values.yaml and `values` on top (as a file)."""
        extra = self.work / f"values-{namespace}-{release}.json"
        extra.write_text(json.dumps(values))
        args = ["install", release, str(CHART), "--namespace", namespace, "-f", str(VALUES), "-f", str(extra)]
        if wait:
            args += ["--wait", "--timeout", "4m"]
        self.run(*args)

    def uninstall(self, release: str, namespace: str) -> None:
        """`helm uninstall` without waiting: the release's objects deleted at once. A release that
        is not there (its install failed) is logged; deleting its namespace removes the rest."""
        try:
            self.run("uninstall", release, "--namespace", namespace)
        except subprocess.CalledProcessError as e:
            log(f"helm uninstall {release} -n {namespace}: {e.stderr.strip()}")

    def upgrade(self, release: str, namespace: str, values: dict) -> None:
        """`helm upgrade --reuse-values` of the chart with `values` on top (as a file), without
        waiting: the caller follows the rollout."""
        extra = self.work / f"upgrade-{namespace}-{release}.json"
        extra.write_text(json.dumps(values))
        self.run("upgrade", release, str(CHART), "--namespace", namespace, "--reuse-values", "-f", str(extra))


_ARTIFACTS: list[Path] = []


def artifacts_dir() -> Path:
    """The run's artifacts directory: E2E_ARTIFACTS (run.sh sets it), or else one made under the
    project's cache the first time it is asked for."""
    if not _ARTIFACTS:
        given = os.environ.get("E2E_ARTIFACTS")
        if given:
            path = Path(given)
        else:
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "consul-registrar"
            path = cache / "e2e-artifacts" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path.mkdir(parents=True, exist_ok=True)
        log(f"artifacts (rollout timelines, pod logs): {path}")
        _ARTIFACTS.append(path)
    return _ARTIFACTS[0]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """The run's artifacts directory (see artifacts_dir)."""
    return artifacts_dir()


@pytest.fixture(scope="session")
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="consul-registrar-e2e.") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def helm(work: Path) -> Helm:
    return Helm(work)


# ---- Consul -------------------------------------------------------------------------------------


@dataclass
class Instance:
    id: str
    status: str  # the worst of its checks, as Consul's `?passing` filter sees it
    address: str
    port: int
    node: str
    meta: dict


class Consul:
    """Consul's HTTP API through `kubectl port-forward` to a server's Service (`svc/consul` of the
    dev server by default): the catalog as the servers hold it (what every Consul client discovers)."""

    RANK = {"passing": 0, "warning": 1, "critical": 2}

    def __init__(self, kube: Kube, service: str = "consul", namespace: str = "consul") -> None:
        self.kube = kube
        self.service = service
        self.namespace = namespace
        self.proc: subprocess.Popen | None = None
        self.url = ""
        # What the port-forward goes to: the Service (kubectl picks one of its pods and keeps it).
        self.target = f"svc/{service}"

    def pin(self, pod: str | None) -> None:
        """From the next request on, forward to server pod `pod` (None: the Service again). A test
        that takes a node away pins a server elsewhere: a forward kept to a pod on the lost node
        fails, and kubectl may pick that pod again until the node controller marks it not Ready."""
        self.close()
        self.target = f"pod/{pod}" if pod else f"svc/{self.service}"

    def _forward(self) -> None:
        self.close()
        self.proc = subprocess.Popen(
            [self.kube.bin, "-n", self.namespace, "port-forward", self.target, ":8500"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8500"
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not match:
            self.close()
            raise OSError(f"kubectl port-forward to {self.target} did not start: {line!r}")
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def close(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def get(self, path: str, timeout: float = 5):
        """GET a JSON answer; one new port-forward and retry if the first attempt fails."""
        for attempt in (1, 2):
            if self.proc is None or self.proc.poll() is not None:
                self._forward()
            try:
                with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                    return json.load(response)
            except (OSError, ValueError):
                if attempt == 2:
                    raise
                self.close()

    def get_or_none(self, path: str):
        """GET a JSON answer; None on 404 (a missing KV key or prefix)."""
        try:
            return self.get(path)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def instances(self, service: str) -> dict[str, Instance]:
        """Every instance of `service`, by id. Raises when Consul does not answer, so an outage
        never reads as "no instance"."""
        found = {}
        for entry in self.get(f"/v1/health/service/{service}"):
            statuses = [c["Status"] for c in entry["Checks"]] or ["passing"]
            worst = max(statuses, key=lambda s: self.RANK.get(s, 3))
            svc = entry["Service"]
            found[svc["ID"]] = Instance(svc["ID"], worst, svc["Address"], svc["Port"], entry["Node"]["Node"],
                                        svc.get("Meta") or {})
        return found

    def statuses(self, service: str) -> dict[str, str]:
        return {i: inst.status for i, inst in self.instances(service).items()}


@pytest.fixture(scope="session")
def consul(kube: Kube) -> Iterator[Consul]:
    """deploy/consul-dev applied: the dev server and a client agent on every node, joined."""
    kube.run("apply", "-k", str(CONSUL_DEV))
    kube.run("-n", "consul", "rollout", "status", "deployment/consul", "--timeout=180s", timeout=200)
    kube.run("-n", "consul", "rollout", "status", "daemonset/consul-client", "--timeout=180s", timeout=200)
    c = Consul(kube)
    nodes = {n["metadata"]["name"] for n in kube.json("get", "nodes")["items"]}

    def agents_joined():
        members = {m["Name"] for m in c.get("/v1/agent/members") if m["Status"] == 1}
        return nodes <= members

    wait_for(f"a Consul client agent on every node ({', '.join(sorted(nodes))}) joined to the server",
             agents_joined, 120, 1)
    log(f"Consul {c.get('/v1/agent/self')['Config']['Version']} at {c.url} (port-forward), agents on {sorted(nodes)}")
    yield c
    c.close()


# The pods of deploy/consul-dev/servers-only's three servers (namespace consul).
CONSUL_SERVERS = "app.kubernetes.io/component=server"


def pod_nodes(kube: Kube, selector: str) -> list[str]:
    """The nodes of the `consul` namespace's pods of `selector`, one entry a pod."""
    return [p["spec"]["nodeName"] for p in kube.pods("consul", selector)]


def wait_servers_formed(kube: Kube, c: Consul, timeout: float) -> None:
    """Every server of the StatefulSet `consul-server` an alive member and a Raft peer, with a
    leader. (A server replaced on another node comes back with a new address; its old self may stay
    a peer a while, until autopilot removes it: extra peers are not waited for.)"""
    replicas = kube.json("-n", "consul", "get", "statefulset", "consul-server")["spec"]["replicas"]

    seen: dict[str, object] = {}

    def formed():
        members = [m for m in c.get("/v1/agent/members") if m["Status"] == 1]
        peers = set(c.get("/v1/status/peers"))
        leader = c.get("/v1/status/leader")
        seen.update(members=sorted(f"{m['Name']}@{m['Addr']}" for m in members), peers=sorted(peers), leader=leader)
        return (len(members) == replicas and leader
                and all(f"{m['Addr']}:{m['Tags'].get('port', '8300')}" in peers for m in members))

    try:
        wait_for(f"{replicas} Consul servers joined, with a leader", formed, timeout, 1)
    except BaseException:
        log(f"the Consul servers last seen: {seen}; pods: " + ", ".join(
            f"{p['metadata']['name']}@{p['spec'].get('nodeName')} {p['status'].get('phase')}"
            for p in kube.pods("consul", CONSUL_SERVERS)))
        raise


@pytest.fixture(scope="session")
def consul_servers(kube: Kube) -> Iterator[Consul]:
    """deploy/consul-dev/servers-only applied: three Consul servers behind the Service
    `consul-server`, no client agent; ready once every server is a member and raft has a leader."""
    kube.run("apply", "-k", str(CONSUL_SERVERS_ONLY))
    kube.run("-n", "consul", "rollout", "status", "statefulset/consul-server", "--timeout=240s", timeout=260)
    c = Consul(kube, service="consul-server")
    wait_servers_formed(kube, c, 120)
    # One server a node where there are three nodes (the manifest's spread): losing a node must
    # not take raft's quorum with it (test_nodes.py loses workers).
    placed = pod_nodes(kube, CONSUL_SERVERS)
    if len(kube.json("get", "nodes")["items"]) >= len(placed):
        assert len(set(placed)) == len(placed), f"the Consul servers share nodes: {placed}"
    log(f"Consul {c.get('/v1/agent/self')['Config']['Version']}: three servers behind svc/consul-server, "
        f"no client agent, at {c.url} (port-forward)")
    yield c
    c.close()


# ---- the demo release ---------------------------------------------------------------------------


@dataclass
class Demo:
    """One install of the chart: the demo app with the sidecar, `service` registered per pod."""

    kube: Kube
    consul: Consul
    namespace: str
    service: str
    release: str = "demo"

    @property
    def selector(self) -> str:
        return f"app.kubernetes.io/instance={self.release}"

    @property
    def deployment(self) -> str:
        names = self.kube.run("-n", self.namespace, "get", "deployments", "-l", self.selector, "-o", "name").split()
        assert len(names) == 1, f"expected one Deployment of release {self.release}, got {names}"
        return names[0]

    def pods(self) -> list[dict]:
        return self.kube.pods(self.namespace, self.selector)

    def instance_id(self, pod: str) -> str:
        return f"{self.service}.{self.namespace}.{pod}"

    def instances(self) -> dict[str, Instance]:
        return self.consul.instances(self.service)

    def all_passing(self, n: int) -> bool:
        """Exactly `n` instances, all passing, one for each of the `n` live pods."""
        pods = [p for p in self.pods() if p["status"].get("phase") == "Running"]
        instances = self.instances()
        want = {self.instance_id(p["metadata"]["name"]) for p in pods}
        return (len(pods) == n and set(instances) == want
                and all(i.status == "passing" for i in instances.values()))

    def flip(self, pod: str, status: str) -> None:
        self.kube.exec(self.namespace, pod, "app", "/usr/local/bin/demo-app", "set", "--control", "127.0.0.1:8080",
                       status)

    def app_serves(self, pod: str) -> bool:
        """The app answers SERVING to a gRPC health check from inside its pod (the sidecar's
        binary is a grpc_health_probe)."""
        proc = subprocess.run(
            [self.kube.bin, "-n", self.namespace, "exec", pod, "-c", "consul-registrar", "--",
             "/usr/local/bin/consul-registrar", "probe", "--addr", "127.0.0.1:50051", "--service",
             "helloworld.Greeter"], capture_output=True, text=True, timeout=30)
        return proc.returncode == 0


@pytest.fixture
def demo(request, kube: Kube, helm: Helm, consul: Consul) -> Iterator[Callable[..., Demo]]:
    """`demo(values={...}, wait=True, before=fn)`: installs the chart in namespace `e2e-<test>` with service
    `hello-<test>`; removed after the test, which then waits until Consul holds none of its
    instances (a leftover would be a defect: the pods drain on deletion)."""
    yield from _demo_releases(request, kube, helm, consul, catalog=False)


# The chart's catalog mode against deploy/consul-dev/servers-only: the servers' Service (the
# sidecar's address, as consul-k8s names it), the virtual node and session TTL left to their
# defaults (consul-registrar-<node>, 10 s).
CATALOG_VALUES = {"consul": {"mode": "catalog", "address": "http://consul-server.consul.svc.cluster.local:8500"}}
SESSION_TTL = 10  # catalog mode's default (the values above leave consul.catalog.sessionTTL empty)


@pytest.fixture
def catalog_demo(request, kube: Kube, helm: Helm, consul_servers: Consul) -> Iterator[Callable[..., Demo]]:
    """`demo` in catalog mode (CATALOG_VALUES; the service without the agent-only check fields),
    judged through the servers-only Consul; namespace `e2e-<test>`, service `hello-<test>`."""
    yield from _demo_releases(request, kube, helm, consul_servers, catalog=True)


def _demo_releases(request, kube: Kube, helm: Helm, consul: Consul, catalog: bool) -> Iterator[Callable[..., Demo]]:
    made: list[Demo] = []

    def install(values: dict | None = None, wait: bool = True, suffix: str = "",
                before: Callable[[Demo], None] | None = None) -> Demo:
        short = re.sub(r"^test_\d*_?", "", request.node.originalname).replace("_", "-")[:30].strip("-") + suffix
        d = Demo(kube, consul, f"e2e-{short}", f"hello-{short}")
        kube.create_namespace(d.namespace)
        made.append(d)
        service = json.loads(json.dumps(base_service()))
        service["name"] = d.service
        merged = {"manifest": {"services": [service]}}
        if catalog:
            service.pop("check", None)  # ttl and deregisterCriticalServiceAfter are agent-only
            deep_merge(merged, json.loads(json.dumps(CATALOG_VALUES)))
        deep_merge(merged, values or {})
        if before:
            before(d)
        helm.install(d.release, d.namespace, merged, wait=wait)
        return d

    yield install
    for d in made:
        if getattr(request.node, "rep_call_failed", False):
            diagnostics(d)
        # What the test owes is that Consul holds nothing of the release once its pods are told to
        # stop (they drain at once). `helm uninstall` deletes the workloads at once (the namespace
        # controller takes seconds to reach them); the namespace's own removal goes on while the
        # next test runs.
        helm.uninstall(d.release, d.namespace)
        kube.delete_namespace(d.namespace, wait=False)
        wait_for(f"no instance of {d.service} left in Consul after its namespace was deleted",
                 lambda d=d: not d.instances(), 60, 0.5)
        if catalog:
            # Every sidecar drained: no liveness key (KV) and no session of the release is left.
            # A pod drains within its grace period (the chart's 30 s), and a holder of a shared
            # session that covered peers leaves it to expire, with the keys it still holds,
            # 2 × sessionTTL after that, so that its peers can move their keys.
            mine = f".{d.namespace}."
            wait_for(f"no liveness key or session of {d.namespace} left in Consul", lambda: not [
                k for k in (consul.get_or_none("/v1/kv/?keys") or []) if mine in k] and not [
                s for s in consul.get("/v1/session/list") if mine in s.get("Name", "")],
                30 + 2 * SESSION_TTL + 15, 0.5)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.rep_call_failed = report.failed
    return report


def diagnostics(d: Demo) -> None:
    log(f"--- diagnostics of {d.namespace} ---")
    print(d.kube.run("-n", d.namespace, "get", "pods", "-o", "wide", check=False))
    print(d.kube.run("-n", d.namespace, "describe", "pods", check=False)[-6000:])
    for container in ("consul-registrar", "app"):
        print(d.kube.run("-n", d.namespace, "logs", "-l", d.selector, "-c", container, "--tail=30", "--prefix",
                         check=False))
    try:
        for inst in d.instances().values():
            print(f"  consul: {inst.id} {inst.status} {inst.address} node={inst.node}")
    except OSError as e:
        print(f"  consul: {e}")


def base_service() -> dict:
    """The service of tests/e2e/values.yaml (read with PyYAML, which the venv has)."""
    import yaml

    return yaml.safe_load(VALUES.read_text())["manifest"]["services"][0]


def deep_merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value
    return into


# ---- the cluster's nodes ------------------------------------------------------------------------


def ready(node: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))


def schedulable_workers(kube: Kube) -> list[str]:
    """Ready nodes that take ordinary pods: not cordoned, no NoSchedule/NoExecute taint (the
    control plane's)."""
    found = []
    for node in kube.json("get", "nodes")["items"]:
        taints = node["spec"].get("taints") or []
        if node["spec"].get("unschedulable") or any(t.get("effect") in ("NoSchedule", "NoExecute") for t in taints):
            continue
        if ready(node):
            found.append(node["metadata"]["name"])
    return sorted(found)


def nodes_of(d: Demo) -> dict[str, str]:
    """pod → node of the release's running pods."""
    return {p["metadata"]["name"]: p["spec"]["nodeName"] for p in d.pods() if p["status"].get("phase") == "Running"}


def assert_spread(d: Demo, workers: list[str]) -> dict[str, str]:
    placed = nodes_of(d)
    if set(placed.values()) != set(workers):
        nodes = {n["metadata"]["name"]: (n["spec"].get("unschedulable", False), n["spec"].get("taints"),
                                         n["metadata"].get("labels"))
                 for n in d.kube.json("get", "nodes")["items"]}
        # What the scheduler saw: the pods' events, and the nodes' since the test began.
        events = d.kube.run("get", "events", "-A", "--sort-by=.lastTimestamp", "-o",
                            "custom-columns=TIME:.lastTimestamp,NS:.metadata.namespace,OBJ:.involvedObject.name,"
                            "REASON:.reason,MSG:.message", check=False)
        print(events[-20000:], flush=True)
        pytest.fail(f"the pods should be spread over the workers {workers}: {placed}; "
                    f"nodes (cordoned, taints, labels): {nodes}")
    return placed


# ---- the provider's commands for containers and nodes -------------------------------------------


def provider_command(variable: str, what: str, timeout: float = 30) -> Callable[[str], None]:
    """The provider's command in `variable` (set by tests/e2e/run.sh), run with one argument
    appended. Without it the test fails under CI=true and skips otherwise, saying `what` it needed."""
    command = os.environ.get(variable, "")
    if not command:
        message = f"{variable} is not set: the provider has no way to {what}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)

    def run(argument: str) -> None:
        subprocess.run([*shlex.split(command), argument], check=True, timeout=timeout)

    return run


def bare_id(container_id: str) -> str:
    """The status's `containerd://<id>` without the runtime's prefix."""
    return container_id.split("://", 1)[-1]


@pytest.fixture(scope="session")
def kill_container() -> Callable[[str], None]:
    """SIGKILLs a container by its runtime id through the provider's E2E_KILL_CONTAINER command
    (Kubernetes has no API that kills one container of a running pod)."""
    kill = provider_command("E2E_KILL_CONTAINER", "kill a container")
    return lambda container_id: kill(bare_id(container_id))


@pytest.fixture(scope="session")
def stop_container() -> Callable[[str], None]:
    """SIGSTOPs a container by its runtime id through E2E_STOP_CONTAINER: the process answers
    nothing while its sockets stay open (the kernel still accepts connections)."""
    stop = provider_command("E2E_STOP_CONTAINER", "stop a container")
    return lambda container_id: stop(bare_id(container_id))


@pytest.fixture(scope="session")
def continue_container() -> Callable[[str], None]:
    """SIGCONTs a container stopped by `stop_container`, through E2E_CONTINUE_CONTAINER (set by
    run.sh: the provider's `continue-container` verb, or ctr for the local provider)."""
    cont = provider_command("E2E_CONTINUE_CONTAINER", "continue a stopped container")
    return lambda container_id: cont(bare_id(container_id))
