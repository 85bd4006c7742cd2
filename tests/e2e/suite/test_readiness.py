"""Issue 19 on a real kubelet: the pod is Ready only while Consul holds its instances passing, so
Kubernetes' own rollout machinery protects the service from apps that start slowly or never serve,
and a pod deleted while its app is still starting never comes back as passing. Each test installs
its own release of the chart (tests/e2e/values.yaml: the sidecar talks to the node-local agent) in
a namespace of its own and is judged through Consul's HTTP API and the tutorial's Go client's
report (resolving through the node's agent, `healthy=true`, 100 RPC/s):

1. `helm upgrade` under traffic to a build whose app never serves (the demo app started
   NOT_SERVING): the rollout does not complete (the new pod is never Ready), the old pods keep
   serving and passing, 0 failed RPCs.
2. `kubectl rollout restart` under traffic of an app that serves only 15 s after it starts (the
   demo app's `--start-delay 15s`: its port is closed meanwhile), with 1 replica and with 3: each
   old pod goes only once its replacement is passing in Consul, 0 failed RPCs.
3. A pod deleted while its app is still starting, timed so that the app opens its port during the
   drain delay: its instance is never passing after the delete (a drain heals only after a
   restart, and an app that was still starting is no restart).

Figures: `FIGURE readiness_<what>=…`. Nothing here assumes one node.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime

from conftest import VALUES, Demo, Kube, container_state, figure, log, wait_for
from test_scenarios import client_pod, client_report, pod_names, stop_client, stop_client_after_the_old_pods

START_DELAY = 15  # seconds the slow app keeps its port closed after it starts
# The most the Go client sends in the slow rollouts (three pods, each 15 s to serve, a 3 s drain:
# about 60 s here); it is stopped once every old pod is gone and 5 s more have passed.
SLOW_TRAFFIC_SECONDS = 240


def app_args(*extra: str) -> list[str]:
    """The demo app's arguments of tests/e2e/values.yaml, and `extra`."""
    import yaml

    return [*yaml.safe_load(VALUES.read_text())["app"]["args"], *extra]


def start_traffic(kube: Kube, d: Demo, seconds: int) -> float:
    """The Go client as a pod sending to `d.service` for `seconds`; returns when it has had a first
    successful RPC (time.monotonic())."""
    pod = client_pod(d.service)
    args = pod["spec"]["containers"][0]["args"]
    args[args.index("-duration") + 1] = f"{seconds}s"
    kube.apply(pod, d.namespace)
    wait_for("the Go client sending (a first successful RPC through Consul)",
             lambda: "sending" in kube.logs(d.namespace, "hello-client", "hello-client"), 90, 0.5)
    return time.monotonic()


def assert_no_failed_rpcs(name: str, report: dict) -> None:
    figure(f"readiness_{name}_rpcs_sent", report["sent"], "RPCs")
    figure(f"readiness_{name}_rpcs_failed", report["failed"], "RPCs")
    assert report["ok"] > 0, report
    assert report["failed"] == 0, f"{name}: {report['failed']} failed RPCs: {report['errors']}, " \
                                  f"first: {report['first_error']}"


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


# ---- 1. an upgrade to an app that never serves --------------------------------------------------


def test_upgrade_to_an_app_that_never_serves_stalls_and_the_old_pods_keep_serving(demo, kube, helm):
    d = demo()
    replicas = 3
    wait_for("all passing", lambda: d.all_passing(replicas), 120)
    old = set(pod_names(d))
    old_ids = {d.instance_id(p) for p in old}
    seconds = 60
    start_traffic(kube, d, seconds)

    began = time.monotonic()
    helm.upgrade(d.release, d.namespace, {"app": {"args": app_args("--start", "not-serving")}})
    # For 40 s: the old pods' instances stay passing, nothing else ever passes, and the rollout
    # does not complete (its new pod is not Ready: Consul holds its instance critical).
    new_seen: set[str] = set()
    while time.monotonic() - began < 40:
        statuses = d.consul.statuses(d.service)
        passing = {i for i, s in statuses.items() if s == "passing"}
        assert passing == old_ids, f"passing instances {sorted(passing)}, the old pods' {sorted(old_ids)}"
        for pod in d.pods():
            name = pod["metadata"]["name"]
            if name not in old:
                new_seen.add(name)
                assert not ready(pod), f"the new pod {name} is Ready with an app that never serves"
        time.sleep(0.5)
    assert new_seen, "the upgrade made no new pod"
    deployment = kube.json("-n", d.namespace, "get", d.deployment)
    status = deployment["status"]
    log(f"after 40 s: {json.dumps({k: status.get(k) for k in ('replicas', 'updatedReplicas', 'readyReplicas', 'availableReplicas')})}")
    assert status.get("availableReplicas") == replicas, status
    assert status.get("updatedReplicas", 0) < replicas, "the rollout went through"
    assert set(pod_names(d)) >= old, "an old pod was taken down"
    rollout = kube.run("-n", d.namespace, "rollout", "status", d.deployment, "--timeout=5s", timeout=30,
                       check=False)
    assert "successfully rolled out" not in rollout, rollout
    figure("readiness_never_serving_new_pods_ready", 0, "pods")
    figure("readiness_never_serving_old_pods_passing", len(old_ids), "instances")

    # The stall shown: the client, still sending, stopped here rather than left to run out its 60 s.
    client = kube.pod(d.namespace, "hello-client")
    assert container_state(client, "hello-client") == "running", (
        f"the client stopped before the stall was shown: raise its {seconds} s")
    report = client_report(stop_client(kube, d.namespace))
    log(f"never-serving upgrade: client report {json.dumps(report)}")
    assert_no_failed_rpcs("never_serving_upgrade", report)
    assert set(report["by_backend"]) <= old, (report["by_backend"], old)


# ---- 2. rollouts of an app that serves 15 s after it starts -------------------------------------


def slow_rollout(d: Demo, kube: Kube, replicas: int, name: str) -> None:
    wait_for("all passing", lambda: d.all_passing(replicas), 180)
    before = set(pod_names(d))
    sending_since = start_traffic(kube, d, SLOW_TRAFFIC_SECONDS)

    kube.run("-n", d.namespace, "rollout", "restart", d.deployment)
    kube.run("-n", d.namespace, "rollout", "status", d.deployment, "--timeout=300s", timeout=320)
    wait_for("the restarted pods all passing", lambda: d.all_passing(replicas) and not (set(pod_names(d)) & before),
             120)
    rollout_seconds = time.monotonic() - sending_since
    figure(f"readiness_{name}_rollout", rollout_seconds, "s")
    report = client_report(stop_client_after_the_old_pods(
        kube, d, before, rollout_seconds, f"SLOW_TRAFFIC_SECONDS (now {SLOW_TRAFFIC_SECONDS})"))
    log(f"{name}: rollout done {rollout_seconds:.1f} s into the traffic; client report {json.dumps(report)}")
    assert_no_failed_rpcs(name, report)
    served = set(report["by_backend"])
    assert served & before and served - before, (served, before)


def test_rollout_of_an_app_that_serves_15s_after_it_starts_one_replica(demo, kube):
    d = demo({"replicaCount": 1, "app": {"args": app_args("--start-delay", f"{START_DELAY}s")}}, suffix="-1")
    slow_rollout(d, kube, 1, "slow_start_1_replica")


def test_rollout_of_an_app_that_serves_15s_after_it_starts_three_replicas(demo, kube):
    d = demo({"app": {"args": app_args("--start-delay", f"{START_DELAY}s")}}, suffix="-3")
    slow_rollout(d, kube, 3, "slow_start_3_replicas")


# ---- 3. a pod deleted while its app is still starting -------------------------------------------


def loading_since(kube: Kube, d: Demo, pod: str) -> datetime | None:
    """When the app container began loading (its "loading for" line, timestamped by the kubelet)."""
    out = kube.run("-n", d.namespace, "logs", pod, "-c", "app", "--timestamps", check=False)
    for line in out.splitlines():
        if "loading for" in line:
            stamp = re.sub(r"(\.\d{6})\d*", r"\1", line.split()[0]).replace("Z", "+00:00")
            return datetime.fromisoformat(stamp)
    return None


def test_a_pod_deleted_while_its_app_is_starting_is_never_passing_after_the_delete(demo, kube):
    delay = 24  # the app's --start-delay
    # A drain delay (tests/e2e/values.yaml: 3 s) long enough that the port opens inside the drain
    # however long the kubelet takes to run the preStop (up to 4 s), and a grace period that holds
    # it (the chart requires drain delay + deregisterTimeout 10 s + the app's 5 s: 23 s).
    drain_delay = 8
    d = demo({"replicaCount": 1, "app": {"args": app_args("--start-delay", f"{delay}s")},
              "manifest": {"drain": {"delay": f"{drain_delay}s"}}, "terminationGracePeriodSeconds": 25},
             wait=False)
    victim = wait_for("the pod", lambda: pod_names(d) and pod_names(d)[0], 120, 0.5)
    iid = d.instance_id(victim)
    since = wait_for("the app loading", lambda: loading_since(kube, d, victim), 120, 0.5)
    wait_for(f"{iid} registered (critical: the app is still loading)",
             lambda: d.consul.statuses(d.service).get(iid) == "critical", 60, 0.25)

    # Delete it 4 s before the app opens its port: the preStop drains (8 s), and the app starts
    # serving inside the drain delay; the kubelet stops it once the preStop answers.
    delete_at = since.timestamp() + delay - 4
    wait = delete_at - time.time()
    assert wait > 0, f"too late to delete {victim} before its app opens its port"
    time.sleep(wait)
    began = time.monotonic()
    kube.run("-n", d.namespace, "delete", "pod", victim, "--wait=false")
    seen: list[str] = []
    while True:
        status = d.consul.statuses(d.service).get(iid)
        if not seen or seen[-1] != (status or "gone"):
            seen.append(status or "gone")
            log(f"{time.monotonic() - began:5.1f} s after the delete: {iid} {status or 'gone'}")
        assert status != "passing", f"{iid} passing {time.monotonic() - began:.1f} s after its pod was deleted " \
                                    f"(its app was still starting): {seen}"
        if kube.pod(d.namespace, victim) is None and status is None:
            break
        assert time.monotonic() - began < 60, f"{victim} not gone within 60 s: {seen}"
        time.sleep(0.1)
    figure("readiness_deleted_while_starting_gone", time.monotonic() - began, "s")
    # Some seconds more: nothing puts it back.
    for _ in range(30):
        assert iid not in d.consul.statuses(d.service), f"{iid} came back"
        time.sleep(0.1)
