"""Issue 15 on a real kubelet: the sidecar added to workloads the project did not write, by the two
adoption routes of docs/add-to-a-workload.md, judged through Consul's HTTP API.

- **The library route**: a copy of examples/charts/my-app (an app's own chart) whose Chart.yaml
  points at this checkout's charts/consul-registrar-lib, `helm dependency build` as a team would,
  `helm install` with the locally built images as a Deployment and as a StatefulSet, `helm test`.
- **The Component route**: a kustomize overlay written here, in a temporary directory, around a
  team's own workload ("ledger": its own names, labels, annotations and volume, no sidecar), with
  the Component of deploy/components/consul-registrar, a drain-token Secret and a manifest
  ConfigMap generator, `kubectl apply -k` as a Deployment and as a StatefulSet.

Each variant, like the chart's scenarios 1, 2 and 4 (test_scenarios.py): every pod's instance
passing at its pod IP; the app flipped NOT_SERVING → critical → back passing; `kubectl delete pod`
→ critical while the app still serves, gone before the app container stops, and not back while the
pod is still terminating. The library route's StatefulSet also has a drain cut off (the sidecar
frozen once its instance is marked draining, the pod force-deleted): the new pod of the same name
gets Ready. Figures: `FIGURE adopt_<route>_<kind>_<what>=… s`.

Namespaces `adopt-<route>-<kind>`, removed afterwards (and Consul checked empty of their service).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import (REPO, Consul, Helm, Kube, container_state, container_status, deregistered_before_app_stops,
                      figure, log, serves_while_draining, wait_for)

REPLICAS = 2
LIBRARY = REPO / "charts" / "consul-registrar-lib"
MY_APP = REPO / "examples" / "charts" / "my-app"
COMPONENT = REPO / "deploy" / "components" / "consul-registrar"
APP_PORT = 50051
CONTROL = "127.0.0.1:8080"
KINDS = ["Deployment", "StatefulSet"]


# ---- a workload the project did not write, with the sidecar added -------------------------------


@dataclass
class Workload:
    """One adopted workload: its pods (by `selector`), its app container `app`, its service in Consul."""

    kube: Kube
    consul: Consul
    route: str
    kind: str
    namespace: str
    service: str
    selector: str
    app: str
    replicas: int = REPLICAS
    figures: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"adopt_{self.route}_{self.kind.lower()}"

    def figure(self, what: str, value, unit: str = "s") -> None:
        figure(f"{self.name}_{what}", value, unit)

    def pods(self) -> list[dict]:
        return self.kube.pods(self.namespace, self.selector)

    def running(self) -> list[dict]:
        return [p for p in self.pods() if p["status"].get("phase") == "Running"]

    def ready(self) -> list[dict]:
        """The running pods whose Ready condition is True."""
        return [p for p in self.running()
                if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]

    def instance_id(self, pod: str) -> str:
        return f"{self.service}.{self.namespace}.{pod}"

    def statuses(self) -> dict[str, str]:
        return self.consul.statuses(self.service)

    def all_passing(self) -> bool:
        pods = self.running()
        statuses = self.statuses()
        want = {self.instance_id(p["metadata"]["name"]) for p in pods}
        return len(pods) == self.replicas and set(statuses) == want and set(statuses.values()) == {"passing"}

    def flip(self, pod: str, status: str) -> None:
        self.kube.exec(self.namespace, pod, self.app, "/usr/local/bin/demo-app", "set", "--control", CONTROL, status)

    def app_serves(self, pod: str) -> bool:
        """SERVING to a gRPC health check from inside the pod (the sidecar binary's `probe`)."""
        proc = subprocess.run(
            [self.kube.bin, "-n", self.namespace, "exec", pod, "-c", "consul-registrar", "--",
             "/usr/local/bin/consul-registrar", "probe", "--addr", f"127.0.0.1:{APP_PORT}", "--service",
             "helloworld.Greeter"], capture_output=True, text=True, timeout=30)
        return proc.returncode == 0


def manifest_service(service: str) -> dict:
    """The service of the manifest both routes use: the demo app's gRPC health, a quick cadence."""
    return {
        "name": service,
        "port": APP_PORT,
        "tags": ["grpc", "adopt"],
        "meta": {"version": "v1"},
        "health": {"address": "127.0.0.1", "service": "helloworld.Greeter", "interval": "1s", "timeout": "1s"},
        "check": {"ttl": "10s", "deregisterCriticalServiceAfter": "1m"},
    }


DRAIN = {"delay": "3s", "deregisterTimeout": "10s"}
APP_ARGS = ["serve", "--listen", f"0.0.0.0:{APP_PORT}", "--control", CONTROL, "--health-service",
            "helloworld.Greeter"]


# ---- the three checks, the same for every route -------------------------------------------------


def check_registered(w: Workload, began: float) -> None:
    """Every running pod has its own instance, passing, at its pod IP and the app's port, with the pod's meta."""
    wait_for(f"{w.replicas} instances of {w.service}, all passing", w.all_passing, 180)
    w.figure("to_all_passing", time.monotonic() - began)
    # Consul's passing and the pod's Ready come from different probes: the sidecar's (1 s here) and
    # the app container's own readinessProbe (the example chart keeps Kubernetes' 10 s period). And
    # `helm install --wait` does not wait for every DaemonSet pod to be Ready (it allows
    # maxUnavailable, 1, of them not to be). So every pod is given one app probe period to be Ready.
    wait_for(f"{w.replicas} pods of {w.service} Ready", lambda: len(w.ready()) == w.replicas, 30)
    instances = w.consul.instances(w.service)
    for pod in w.running():
        name = pod["metadata"]["name"]
        inst = instances[w.instance_id(name)]
        assert inst.address == pod["status"]["podIP"] and inst.port == APP_PORT, (inst, pod["status"]["podIP"])
        expected = {"pod-name": name, "pod-namespace": w.namespace, "node-name": pod["spec"]["nodeName"],
                    "pod-uid": pod["metadata"]["uid"], "managed-by": "consul-registrar", "version": "v1"}
        assert expected.items() <= inst.meta.items(), inst.meta


def check_flip(w: Workload) -> None:
    """NOT_SERVING → critical (the other instances stay passing) → SERVING → passing."""
    pod = w.running()[0]["metadata"]["name"]
    iid = w.instance_id(pod)
    began = time.monotonic()
    w.flip(pod, "not-serving")
    wait_for(f"{iid} critical", lambda: w.statuses().get(iid) == "critical", 20, 0.1)
    w.figure("not_serving_to_critical", time.monotonic() - began)
    others = {i: s for i, s in w.statuses().items() if i != iid}
    assert len(others) == w.replicas - 1 and all(s == "passing" for s in others.values()), others
    began = time.monotonic()
    w.flip(pod, "serving")
    wait_for(f"{iid} passing again", lambda: w.statuses().get(iid) == "passing", 20, 0.1)
    w.figure("serving_to_passing", time.monotonic() - began)


def check_drain(w: Workload) -> None:
    """`kubectl delete pod`: critical while the app still serves, gone before the app container
    stops (the preStop drain with the token), not back while the pod terminates; then the
    replacement registers. A StatefulSet's replacement has the same name, so the pod is followed by UID."""
    victim_pod = w.running()[0]
    victim, uid = victim_pod["metadata"]["name"], victim_pod["metadata"]["uid"]
    iid = w.instance_id(victim)

    def old_pod() -> dict | None:
        pod = w.kube.pod(w.namespace, victim)
        return pod if pod and pod["metadata"]["uid"] == uid else None

    began = time.monotonic()
    w.kube.run("-n", w.namespace, "delete", "pod", victim, "--wait=false")
    wait_for(f"{iid} critical (draining)", lambda: w.statuses().get(iid) == "critical", 20, 0.1)
    w.figure("delete_to_critical", time.monotonic() - began)
    serves_while_draining(victim, iid, lambda: container_state(old_pod(), w.app), lambda: w.app_serves(victim),
                          lambda: w.statuses().get(iid))

    gone_at, stopped_at = deregistered_before_app_stops(
        victim, iid, lambda: container_state(old_pod(), w.app), lambda: w.statuses().get(iid))
    w.figure("delete_to_deregistered", gone_at - began)
    w.figure("deregistered_before_app_stopped", stopped_at - gone_at)
    # Pod deletion ends drained: while the old pod is still there (its sidecar may still run), its
    # instance does not come back. (A StatefulSet's replacement, same name, only starts after.)
    while old_pod() is not None:
        assert w.statuses().get(iid) is None, f"{iid} came back while {victim} was terminating"
        assert time.monotonic() - began < 90, f"{victim} was not gone within 90 s"
        time.sleep(0.2)
    w.figure("delete_to_pod_gone", time.monotonic() - began)
    began = time.monotonic()
    wait_for("the replacement pod registered: all passing", w.all_passing, 180)
    w.figure("replacement_to_all_passing", time.monotonic() - began)


def check_cut_off_drain(w: Workload, stop_container) -> None:
    """A StatefulSet pod whose drain is cut off (its sidecar frozen once the instance is marked
    draining, then the pod force-deleted: as when the grace period ends mid-drain) leaves its
    instance marked draining in Consul; the controller at once makes a new pod of the same name,
    whose sidecar finds that mark under its own instance ID. The new pod is not the old one
    restarted (the mark names the old pod's UID): it registers and gets Ready."""
    victim_pod = w.running()[0]
    victim, uid = victim_pod["metadata"]["name"], victim_pod["metadata"]["uid"]
    iid = w.instance_id(victim)
    sidecar = container_status(victim_pod, "consul-registrar")
    w.kube.run("-n", w.namespace, "delete", "pod", victim, "--wait=false")
    wait_for(f"{iid} critical (draining)", lambda: w.statuses().get(iid) == "critical", 20, 0.1)
    stop_container(sidecar["containerID"])
    began = time.monotonic()
    w.kube.run("-n", w.namespace, "delete", "pod", victim, "--grace-period=0", "--force", "--wait=false")

    def replacement_ready() -> bool:
        pod = w.kube.pod(w.namespace, victim)
        return bool(pod) and pod["metadata"]["uid"] != uid and any(
            c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))

    wait_for(f"{victim}'s replacement (same name, new UID) Ready", replacement_ready, 90, 0.5)
    w.figure("cut_off_drain_to_replacement_ready", time.monotonic() - began)
    wait_for("all passing after the cut-off drain", w.all_passing, 30)
    inst = w.consul.instances(w.service)[iid]
    new_uid = w.kube.pod(w.namespace, victim)["metadata"]["uid"]
    assert inst.meta.get("pod-uid") == new_uid, f"{iid} is not the new pod's: {inst.meta}"


def cleanup(kube: Kube, consul: Consul, namespace: str, service: str) -> None:
    kube.delete_namespace(namespace)
    wait_for(f"no instance of {service} left in Consul after namespace {namespace} was deleted",
             lambda: not consul.instances(service), 60, 0.5)


def diagnostics(w: Workload) -> None:
    log(f"--- diagnostics of {w.namespace} ---")
    print(w.kube.run("-n", w.namespace, "get", "pods", "-o", "wide", check=False))
    print(w.kube.run("-n", w.namespace, "get", "events", "--sort-by=.lastTimestamp", check=False)[-4000:])
    for container in ("consul-registrar", w.app):
        print(w.kube.run("-n", w.namespace, "logs", "-l", w.selector, "-c", container, "--tail=30", "--prefix",
                         check=False))
    try:
        for iid, status in w.statuses().items():
            print(f"  consul: {iid} {status}")
    except OSError as e:
        print(f"  consul: {e}")


# ---- (a) the library route ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def my_app_chart(work: Path, helm: Helm) -> Path:
    """A copy of examples/charts/my-app as a team's chart elsewhere: the dependency pointed at this
    checkout's library (docs/add-to-a-workload.md: `repository: file://<path to this checkout>/charts/consul-registrar-lib`),
    then `helm dependency build`."""
    chart = work / "teams-charts" / "my-app"
    shutil.copytree(MY_APP, chart, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    chart_yaml = chart / "Chart.yaml"
    text = chart_yaml.read_text()
    pointed = re.sub(r"repository: file://\S+", f"repository: file://{LIBRARY}", text)
    assert pointed != text, "examples/charts/my-app/Chart.yaml has no file:// dependency to point at the library"
    chart_yaml.write_text(pointed)
    helm.run("dependency", "build", str(chart))
    assert list((chart / "charts").glob("consul-registrar-lib-*.tgz")), "helm dependency build fetched no library"
    return chart


def my_app_values(kind: str, service: str) -> dict:
    """The team's values: the locally built images, the control port (to flip the app), a service
    name of the test's own. The Deployment and the DaemonSet keep the library's default Consul
    address (the node's client agent, `$(HOST_IP):8500`); the StatefulSet keeps the example's own
    (the dev server's Service), so both addressings a team would pick run."""
    values = {
        "kind": kind,
        "replicaCount": REPLICAS,
        "image": {"repository": "consul-registrar-demo-app", "tag": "dev", "pullPolicy": "Never"},
        "args": APP_ARGS,
        "consulRegistrar": {
            "image": {"repository": "consul-registrar", "tag": "dev", "pullPolicy": "Never"},
            "logFormat": "human",
            "manifest": {"drain": DRAIN, "services": [manifest_service(service)]},
        },
    }
    if kind != "StatefulSet":
        values["consulRegistrar"]["consul"] = {"address": ""}
    return values


# The taints a DaemonSet's pods tolerate without asking (its controller adds these tolerations).
DAEMONSET_TOLERATED = {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable",
                       "node.kubernetes.io/disk-pressure", "node.kubernetes.io/memory-pressure",
                       "node.kubernetes.io/pid-pressure", "node.kubernetes.io/unschedulable",
                       "node.kubernetes.io/network-unavailable"}


def daemonset_nodes(kube: Kube) -> list[str]:
    """The nodes a DaemonSet without tolerations of its own runs a pod on: not those with another
    NoSchedule/NoExecute taint (a kind control plane's), cordoned or not."""
    return [n["metadata"]["name"] for n in kube.json("get", "nodes")["items"]
            if not any(t.get("effect") in ("NoSchedule", "NoExecute") and t.get("key") not in DAEMONSET_TOLERATED
                       for t in n["spec"].get("taints") or [])]


@pytest.mark.parametrize("kind", KINDS + ["DaemonSet"])
def test_library_route_registers_flips_and_drains(kind, kube, helm, consul, work, my_app_chart, stop_container):
    """Also a DaemonSet (one pod per node): its controller adopts an orphan pod its selector
    matches, so a `helm test` pod with the workload's selector labels was deleted by it. The
    StatefulSet also has a pod's drain cut off (`check_cut_off_drain`)."""
    namespace = f"adopt-lib-{kind.lower()}"
    service = namespace
    release = "shop"
    replicas = len(daemonset_nodes(kube)) if kind == "DaemonSet" else REPLICAS
    w = Workload(kube, consul, "library", kind, namespace, service,
                 f"app.kubernetes.io/name=my-app,app.kubernetes.io/instance={release}", "my-app", replicas)
    kube.create_namespace(namespace)
    try:
        values = work / f"values-{namespace}.json"
        values.write_text(json.dumps(my_app_values(kind, service)))
        began = time.monotonic()
        helm.run("install", release, str(my_app_chart), "--namespace", namespace, "-f", str(values),
                 "--wait", "--timeout", "4m")
        check_registered(w, began)
        if kind != "StatefulSet":
            # The default address: the node-local agent, so each instance sits on its pod's node.
            instances = consul.instances(service)
            for pod in w.running():
                inst = instances[w.instance_id(pod["metadata"]["name"])]
                assert inst.node == pod["spec"]["nodeName"], f"{inst.id} registered on Consul node {inst.node}"
        # The chart route ends with `helm test`: the release's manifest validated by the sidecar.
        out = helm.run("test", release, "--namespace", namespace, "--timeout", "2m")
        assert re.search(r"Phase:\s+Succeeded", out), out
        wait_for("the workload untouched by `helm test`: all passing", w.all_passing, 30)
        check_flip(w)
        check_drain(w)
        if kind == "StatefulSet":
            check_cut_off_drain(w, stop_container)
    except BaseException:
        diagnostics(w)
        raise
    finally:
        cleanup(kube, consul, namespace, service)


# ---- (b) the Component route --------------------------------------------------------------------

DRAIN_TOKEN = "adopt-component-drain-token-0123456789"


def team_workload(kind: str) -> list[dict]:
    """A team's own workload "ledger", written without consul-registrar: its own names, labels,
    annotations and volume; only the inject label on the workload opts it in."""
    labels = {"app.kubernetes.io/name": "ledger", "team": "payments"}
    pod_spec = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 20,  # >= drain delay 3 s + deregisterTimeout 10 s + app 5 s
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "ledger",
            "image": "consul-registrar-demo-app:dev",
            "imagePullPolicy": "Never",
            "args": APP_ARGS,
            "ports": [{"name": "grpc", "containerPort": APP_PORT}],
            "readinessProbe": {"grpc": {"port": APP_PORT, "service": "helloworld.Greeter"}, "periodSeconds": 2},
            "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "scratch", "mountPath": "/var/tmp"}],
        }],
        "volumes": [{"name": "scratch", "emptyDir": {}}],
    }
    spec = {
        "replicas": REPLICAS,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "ledger"}},
        "template": {"metadata": {"labels": labels, "annotations": {"team.example/owner": "payments"}},
                     "spec": pod_spec},
    }
    docs = []
    if kind == "StatefulSet":
        spec = {"serviceName": "ledger", "podManagementPolicy": "Parallel", **spec}
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ledger", "labels": labels},
                     "spec": {"clusterIP": "None", "selector": {"app.kubernetes.io/name": "ledger"},
                              "ports": [{"name": "grpc", "port": APP_PORT, "targetPort": "grpc"}]}})
    docs.insert(0, {"apiVersion": "apps/v1", "kind": kind,
                    "metadata": {"name": "ledger", "labels": {**labels, "consul-registrar.io/inject": "true"}},
                    "spec": spec})
    return docs


def component_overlay(work: Path, kind: str, namespace: str, service: str) -> Path:
    """The overlay a team writes (docs/add-to-a-workload.md, route 3): its workload, the
    drain-token Secret, the manifest generator and the Component; plus the locally built sidecar
    image (`images:`, and pullPolicy Never so the node never tries a registry)."""
    d = work / f"overlay-{namespace}"
    d.mkdir(parents=True)
    dump = lambda docs: "\n---\n".join(json.dumps(doc) for doc in docs)  # noqa: E731 (JSON is YAML)
    (d / "namespace.yaml").write_text(dump([{"apiVersion": "v1", "kind": "Namespace",
                                             "metadata": {"name": namespace}}]))
    (d / "ledger.yaml").write_text(dump(team_workload(kind)))
    (d / "drain-token.yaml").write_text(dump([{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                               "metadata": {"name": "consul-registrar-drain-token"},
                                               "stringData": {"token": DRAIN_TOKEN}}]))
    (d / "manifest.yaml").write_text(json.dumps({"admin": {"address": "0.0.0.0:9102"}, "drain": DRAIN,
                                                 "services": [manifest_service(service)]}))
    (d / "local-images.yaml").write_text(dump([{
        "apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "ledger"},
        "spec": {"template": {"spec": {"initContainers": [{"name": "consul-registrar",
                                                            "imagePullPolicy": "Never"}]}}}}]))
    (d / "kustomization.yaml").write_text(json.dumps({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "resources": ["namespace.yaml", "ledger.yaml", "drain-token.yaml"],
        # Relative: kustomize refuses an absolute path ("new root ... cannot be absolute").
        "components": [os.path.relpath(COMPONENT, d)],
        "images": [{"name": "ghcr.io/consul-registrar/consul-registrar", "newName": "consul-registrar",
                    "newTag": "dev"}],
        "configMapGenerator": [{"name": "consul-registrar-manifest", "files": ["manifest.yaml"]}],
        "patches": [{"path": "local-images.yaml"}],
    }, indent=1))
    return d


@pytest.mark.parametrize("kind", KINDS)
def test_component_route_registers_flips_and_drains(kind, kube, consul, work):
    namespace = f"adopt-comp-{kind.lower()}"
    service = namespace
    w = Workload(kube, consul, "component", kind, namespace, service, "app.kubernetes.io/name=ledger", "ledger")
    overlay = component_overlay(work, kind, namespace, service)
    kube.delete_namespace(namespace)
    try:
        began = time.monotonic()
        kube.run("apply", "-k", str(overlay))
        kube.run("-n", namespace, "rollout", "status", f"{kind.lower()}/ledger", "--timeout=180s", timeout=200)
        check_registered(w, began)
        # The team's own pieces stayed; the Component's were added.
        spec = w.running()[0]["spec"]
        assert spec["initContainers"][0]["name"] == "consul-registrar", spec["initContainers"]
        assert {"scratch", "consul-registrar-manifest"} <= {v["name"] for v in spec["volumes"]}, spec["volumes"]
        headers = spec["containers"][0]["lifecycle"]["preStop"]["httpGet"]["httpHeaders"]
        assert {"name": "X-Drain-Token", "value": DRAIN_TOKEN} in headers, headers
        check_flip(w)
        check_drain(w)
    except BaseException:
        diagnostics(w)
        raise
    finally:
        cleanup(kube, consul, namespace, service)
