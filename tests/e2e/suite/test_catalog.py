"""Issue 12 on a real kubelet: the chart in catalog mode (`consul.mode: catalog`) against Consul
servers with NO client agent (deploy/consul-dev/servers-only: three servers behind the Service
`consul-server`, consul-k8s's default layout), judged through the servers' HTTP API.

1. `helm install` → every pod's instance passing on the virtual node `consul-registrar-<node>` at
   the node's IP (never an agent's node: this Consul has none), with one liveness key per instance
   held by its sidecar's session; NOT_SERVING → critical → passing; `kubectl delete pod` → critical
   while the app serves, gone before the app stops, its key and session gone too, nothing reaped.
2. The sidecar container SIGKILLed → restarted → it adopts its session and instance (never a
   duplicate); then a pod "crashes" (its sidecar frozen with SIGSTOP and the pod force-deleted with
   grace 0: the kubelet SIGKILLs the frozen sidecar, which never runs again, so no drain at all) →
   the remaining sidecars reap its instance within 2 × sessionTTL + 1 s (the 10 s default: 21 s,
   plus KUBELET_SLACK), counted in `consul_registrar_reaped_total`.
3. `kubectl rollout restart` under 100 RPC/s from the tutorial's Go client resolving through the
   servers' Service → zero failed RPCs, and afterwards one key per new pod and sessions of new
   pods only.
4. The chart's default shared session: the pods of one Kubernetes node hold their keys with one
   session, its holder's (no other session names them, but for the service's elected reaper's,
   which keeps its own); the holder "crashes" (frozen and
   force-deleted) → the other pods' instances never leave (same CreateIndex throughout), the
   holder's is reaped within 2 × sessionTTL + 1 s, and another pod of the node holds a session
   for it.

Figures: `FIGURE catalog_<what>=… s`.
"""

from __future__ import annotations

import json
import time

from conftest import (SESSION_TTL, Consul, Demo, Kube, container_state, container_status, deregistered_before_app_stops,
                      figure, log, serves_while_draining, wait_for)
from test_scenarios import REPLICAS, ROLLOUT_LOG_LEVEL, pod_names, rollout_under_traffic

ADMIN_PORT = 9102
KEY_PREFIX = "consul-registrar/instances"
# The node every sidecar's session lives on (never one with instances).
SESSIONS_NODE = "consul-registrar--sessions"
# Between the SIGSTOP and the kubelet acting on the force deletion (the sidecar is already frozen;
# this only covers our own kubectl calls and the blocking query's wake-up).
KUBELET_SLACK = 4.0


def virtual_node(k8s_node: str) -> str:
    return f"consul-registrar-{k8s_node}"


def liveness_key(consul: Consul, service: str, node: str, instance_id: str) -> dict | None:
    """The instance's KV liveness key (`<prefix>/<service>/<node>/<instance id>`), or None."""
    found = consul.get_or_none(f"/v1/kv/{KEY_PREFIX}/{service}/{node}/{instance_id}")
    return found[0] if found else None


def sessions_of(consul: Consul, node: str, pod: str) -> list[dict]:
    """The sessions of the sidecars on virtual node `node` whose name names the pod
    (`consul-registrar/<node>/<first instance id>/<pod>`); sessions live on the sessions' node."""
    return [s for s in consul.get(f"/v1/session/node/{SESSIONS_NODE}")
            if s.get("Name", "").startswith(f"consul-registrar/{node}/") and pod in s.get("Name", "")]


def holder_session(consul: Consul, node: str) -> str | None:
    """The session holding virtual node `node`'s shared-session holder key, or None."""
    found = consul.get_or_none(f"/v1/kv/{KEY_PREFIX}/.holder/{node}")
    return (found[0].get("Session") if found else None) or None


def reaped_total(kube: Kube, d: Demo) -> float:
    """consul_registrar_reaped_total summed over the running pods' sidecars (API server's pod proxy)."""
    total = 0.0
    for name in pod_names(d):
        metrics = kube.run("get", "--raw", f"/api/v1/namespaces/{d.namespace}/pods/{name}:{ADMIN_PORT}/proxy/metrics")
        for line in metrics.splitlines():
            if line.startswith("consul_registrar_reaped_total"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def assert_registered_on_virtual_nodes(d: Demo, kube: Kube) -> None:
    """Every running pod's instance: passing at the pod IP, on the virtual node of the pod's
    Kubernetes node (at the node's IP, marked as ours, not a Consul member), with one check and a
    liveness key held by its sidecar's own session or by the node's shared session (the chart's
    default), naming the pod."""
    consul = d.consul
    members = consul.get("/v1/agent/members")
    assert all(m["Tags"].get("role") == "consul" for m in members), (
        f"this Consul must have servers only, no client agent: {[(m['Name'], m['Tags'].get('role')) for m in members]}")
    member_names = {m["Name"] for m in members}
    entries = {e["Service"]["ID"]: e for e in consul.get(f"/v1/health/service/{d.service}")}
    pods = [p for p in d.pods() if p["status"].get("phase") == "Running"]
    assert len(pods) == REPLICAS and len(entries) == REPLICAS, (pod_names(d), sorted(entries))
    for pod in pods:
        name = pod["metadata"]["name"]
        iid = d.instance_id(name)
        entry = entries.get(iid)
        assert entry, f"pod {name} has no instance; Consul has {sorted(entries)}"
        node = virtual_node(pod["spec"]["nodeName"])
        assert entry["Node"]["Node"] == node, f"{iid} is on node {entry['Node']['Node']}, not {node}"
        assert node not in member_names, f"{node} is a Consul agent's node: its anti-entropy would delete our entries"
        assert entry["Node"]["Address"] == pod["status"]["hostIP"], entry["Node"]
        assert (entry["Node"].get("Meta") or {}).get("managed-by") == "consul-registrar", entry["Node"]
        service = entry["Service"]
        assert service["Address"] == pod["status"]["podIP"] and service["Port"] == 50051, service
        expected_meta = {"pod-name": name, "pod-namespace": d.namespace, "node-name": pod["spec"]["nodeName"],
                         "pod-uid": pod["metadata"]["uid"], "managed-by": "consul-registrar", "version": "v1"}
        assert expected_meta.items() <= (service.get("Meta") or {}).items(), service.get("Meta")
        checks = entry["Checks"]
        assert len(checks) == 1 and checks[0]["ServiceID"] == iid and checks[0]["Status"] == "passing", (
            f"{iid}: one check carrying the probe's verdict expected (a virtual node has no serfHealth): {checks}")
        key = liveness_key(consul, d.service, node, iid)
        assert key and key.get("Session"), f"{iid} has no liveness key held by a session ({KEY_PREFIX}/{d.service}/{node}/{iid}: {key})"
        own = [s["ID"] for s in sessions_of(consul, node, name)]
        shared = holder_session(consul, node)
        assert len(own) <= 1 and key["Session"] in own + [shared], (
            f"{iid}'s key must be held by its sidecar's own session or the node's shared session {shared}: "
            f"key {key}, its pod's sessions {own}")
        held_by = consul.get(f"/v1/session/info/{key['Session']}")[0]
        assert held_by["Behavior"] == "delete" and held_by["TTL"] == f"{SESSION_TTL}s", held_by


# ---- 1. install, flip, delete -------------------------------------------------------------------


def test_c1_catalog_registers_on_virtual_nodes_flips_and_drains(catalog_demo, kube):
    began = time.monotonic()
    d = catalog_demo()
    wait_for(f"{REPLICAS} instances of {d.service}, all passing", lambda: d.all_passing(REPLICAS), 120)
    figure("catalog_helm_install_to_all_passing", time.monotonic() - began, "s")
    assert_registered_on_virtual_nodes(d, kube)

    # The app's health, one catalog write per verdict.
    pod = pod_names(d)[0]
    iid = d.instance_id(pod)
    began = time.monotonic()
    d.flip(pod, "not-serving")
    wait_for(f"{iid} critical", lambda: d.consul.statuses(d.service).get(iid) == "critical", 20, 0.1)
    figure("catalog_not_serving_to_critical", time.monotonic() - began, "s")
    others = {i: s for i, s in d.consul.statuses(d.service).items() if i != iid}
    assert len(others) == REPLICAS - 1 and set(others.values()) == {"passing"}, others
    began = time.monotonic()
    d.flip(pod, "serving")
    wait_for(f"{iid} passing again", lambda: d.consul.statuses(d.service).get(iid) == "passing", 20, 0.1)
    figure("catalog_serving_to_passing", time.monotonic() - began, "s")

    # kubectl delete pod: the preStop drain, through the catalog.
    victim = pod_names(d)[1]
    iid = d.instance_id(victim)
    node = virtual_node(kube.pod(d.namespace, victim)["spec"]["nodeName"])
    began = time.monotonic()
    kube.run("-n", d.namespace, "delete", "pod", victim, "--wait=false")
    wait_for(f"{iid} critical (draining)", lambda: d.consul.statuses(d.service).get(iid) == "critical", 20, 0.1)
    figure("catalog_delete_to_critical", time.monotonic() - began, "s")
    serves_while_draining(victim, iid, lambda: container_state(kube.pod(d.namespace, victim), "app"),
                          lambda: d.app_serves(victim), lambda: d.consul.statuses(d.service).get(iid))
    gone_at, _ = deregistered_before_app_stops(
        victim, iid, lambda: container_state(kube.pod(d.namespace, victim), "app"),
        lambda: d.consul.statuses(d.service).get(iid))
    figure("catalog_delete_to_deregistered", gone_at - began, "s")
    wait_for(f"{iid}'s liveness key deleted after its deregistration",
             lambda: liveness_key(d.consul, d.service, node, iid) is None, 5, 0.2)
    wait_for(f"the session of {victim}'s sidecar destroyed", lambda: not sessions_of(d.consul, node, victim), 30, 0.5)
    wait_for("the replacement pod registered: all passing", lambda: d.all_passing(REPLICAS), 120)
    assert reaped_total(kube, d) == 0, "a drained pod is deregistered by its own sidecar, not reaped"


# ---- 2. a killed sidecar adopts; a crashed pod is reaped -----------------------------------------


def test_c2_catalog_killed_sidecar_adopts_and_crashed_pod_is_reaped(catalog_demo, kube, kill_container,
                                                                    stop_container):
    d = catalog_demo()
    wait_for("all passing", lambda: d.all_passing(REPLICAS), 120)
    first, second = pod_names(d)[:2]

    # The sidecar alone SIGKILLed: the kubelet restarts it, and it adopts its own session.
    iid = d.instance_id(first)
    node = virtual_node(kube.pod(d.namespace, first)["spec"]["nodeName"])
    session = liveness_key(d.consul, d.service, node, iid)["Session"]
    before = container_status(kube.pod(d.namespace, first), "consul-registrar")
    kill_container(before["containerID"])
    began = last = time.monotonic()
    not_passing = 0.0
    restarted_at = None
    while True:
        instances = d.instances()
        now = time.monotonic()
        assert len([i for i in instances.values() if i.meta.get("pod-name") == first]) <= 1, instances
        assert len(instances) <= REPLICAS, f"more instances than pods: {sorted(instances)}"
        status = instances[iid].status if iid in instances else "missing"
        if status != "passing":
            not_passing += now - last
        last = now
        current = container_status(kube.pod(d.namespace, first), "consul-registrar") or {}
        if restarted_at is None and current.get("restartCount", 0) > before["restartCount"] \
                and "running" in current.get("state", {}):
            restarted_at = now
        if restarted_at is not None and status == "passing" and now - restarted_at > 5:
            break
        assert now - began < 90, f"sidecar of {first} not restarted and passing within 90 s (instance {status})"
        time.sleep(0.2)
    figure("catalog_sidecar_kill_not_passing", not_passing, "s")
    key = liveness_key(d.consul, d.service, node, iid)
    assert key and key["Session"] == session, (
        f"the restarted sidecar should adopt its still-valid session {session} (its own, or its node's "
        f"shared one, which it joins again), its key is held by {key}")
    assert [s["ID"] for s in sessions_of(d.consul, node, first)] in ([session], []), (
        "at most one session per sidecar, the one that holds its key")

    # A crash: the sidecar frozen and the pod force-deleted at once (no preStop, no drain): its
    # instance stays behind until its session expires, then the other sidecars reap it. Frozen
    # (SIGSTOP), not SIGKILLed: a killed sidecar is restarted by the kubelet within a second, and
    # if that beats the kubelet's handling of the deletion, the restarted sidecar gets the pod's
    # SIGTERM and drains: a clean shutdown, not a crash (seen in CI: gone after 4 s, nothing
    # reaped). The kubelet SIGKILLs a frozen process when its grace ends; it never runs again.
    iid = d.instance_id(second)
    node = virtual_node(kube.pod(d.namespace, second)["spec"]["nodeName"])
    sidecar = container_status(kube.pod(d.namespace, second), "consul-registrar")
    reaped_before = reaped_total(kube, d)
    stop_container(sidecar["containerID"])
    began = time.monotonic()
    kube.run("-n", d.namespace, "delete", "pod", second, "--grace-period=0", "--force", "--wait=false")
    bound = 2 * SESSION_TTL + 1 + KUBELET_SLACK
    ghost_seen = False
    while True:
        instances = d.instances()
        now = time.monotonic()
        # The ghost and the replacement pod's instance may overlap: one more than the pods, no more.
        assert len(instances) <= REPLICAS + 1, f"more instances than pods and the ghost: {sorted(instances)}"
        if iid not in instances:
            break
        ghost_seen = True
        assert now - began < bound, (
            f"{iid} of the crashed pod still in Consul {now - began:.1f} s after the crash "
            f"(bound 2 × {SESSION_TTL} s + 1 s + {KUBELET_SLACK} s): {instances[iid]}")
        time.sleep(0.2)
    reaped_after = now - began
    figure("catalog_crashed_pod_reaped_after", reaped_after, "s")
    log(f"{iid} reaped {reaped_after:.1f} s after the crash (bound {bound:.0f} s)")
    assert ghost_seen, "the crashed pod's instance vanished at once: it was drained, not left for the reaper"
    assert liveness_key(d.consul, d.service, node, iid) is None, "the crashed pod's key outlived its session"
    assert not sessions_of(d.consul, node, second), "the crashed pod's session should have expired"
    wait_for("the replacement pod registered: all passing", lambda: d.all_passing(REPLICAS), 120)
    reaped = reaped_total(kube, d) - reaped_before
    figure("catalog_reaped_by_other_sidecars", reaped, "instances")
    assert reaped >= 1, "consul_registrar_reaped_total did not grow: the instance left by another way than the reaper"


# ---- 3. rolling restart under traffic ------------------------------------------------------------


def test_c3_catalog_rollout_restart_under_traffic(catalog_demo, kube):
    """The Go client resolves through the servers' Service (there is no agent on the node)."""
    d = catalog_demo(ROLLOUT_LOG_LEVEL, suffix="-c")
    rollout_under_traffic(d, kube, "catalog", True, consul_address="consul-server.consul.svc.cluster.local:8500")
    # Afterwards (once the old pods' sidecars have finished): one liveness key per new pod, and
    # sessions of new pods only (one per pod, or fewer: the pods of a node share one).
    pods = {p["metadata"]["name"]: p for p in d.pods()}
    want = sorted(f"{KEY_PREFIX}/{d.service}/{virtual_node(p['spec']['nodeName'])}/{d.instance_id(n)}"
                  for n, p in pods.items())

    def only_the_new_pods():
        keys = sorted(k for k in (d.consul.get_or_none(f"/v1/kv/{KEY_PREFIX}/?keys") or []) if f".{d.namespace}." in k)
        sessions = sorted(s["Name"] for s in d.consul.get("/v1/session/list") if f".{d.namespace}." in s.get("Name", ""))
        return keys == want and 1 <= len(sessions) <= len(pods) and all(
            any(name in s for name in pods) for s in sessions) and (keys, sessions)

    keys, sessions = wait_for(f"one key per new pod, sessions of new pods only ({want})", only_the_new_pods, 30, 0.5)
    log("catalog rollout: " + json.dumps({"keys": keys, "sessions": sessions}))


# ---- 4. the shared session: one per node; a crashed holder takes no peer with it -------------------


def test_c4_catalog_pods_of_a_node_share_one_session_and_a_crashed_holder_takes_no_peer(catalog_demo, kube,
                                                                                       stop_container):
    d = catalog_demo(suffix="-s")
    wait_for("all passing", lambda: d.all_passing(REPLICAS), 120)
    by_node: dict[str, list[str]] = {}
    for pod in d.pods():
        by_node.setdefault(pod["spec"]["nodeName"], []).append(pod["metadata"]["name"])
    k8s_node, names = max(by_node.items(), key=lambda kv: len(kv[1]))
    assert len(names) >= 2, f"{REPLICAS} pods on the workers: two share a node ({by_node})"
    node = virtual_node(k8s_node)

    def sharing():
        # The only sessions naming the node's pods: the holder's and, if one of them is the
        # service's elected reaper, its own (a reaper keeps a session of its own).
        shared = holder_session(d.consul, node)
        reaper = (d.consul.get_or_none(f"/v1/kv/{KEY_PREFIX}/.reaper/{d.service}") or [{}])[0].get("Session")
        keys = {n: liveness_key(d.consul, d.service, node, d.instance_id(n)) for n in names}
        own = {s["ID"] for n in names for s in sessions_of(d.consul, node, n)}
        peers = [n for n, k in keys.items() if k and k.get("Session") == shared and shared not in
                 {s["ID"] for s in sessions_of(d.consul, node, n)}]
        return (shared and peers and all(k and k.get("Session") in (shared, reaper) for k in keys.values())
                and own <= {shared, reaper} and (shared, peers))
    # A pod that started before the holder was elected joins it within a sessionTTL or so.
    shared, peers = wait_for(f"the pods of {k8s_node} ({names}) hold their keys with the holder's session",
                             sharing, 3 * SESSION_TTL, 0.5)
    holder = next(s["Name"].rsplit("/", 1)[-1] for s in d.consul.get(f"/v1/session/node/{SESSIONS_NODE}")
                  if s["ID"] == shared)
    log(f"{k8s_node}: {holder} holds the shared session {shared} for {peers}")

    def create_indexes() -> dict[str, int]:
        return {e["ServiceID"]: e["CreateIndex"] for e in d.consul.get(f"/v1/catalog/service/{d.service}")}
    before = create_indexes()
    holder_iid = d.instance_id(holder)
    peer_iids = [d.instance_id(n) for n in peers]

    # The holder "crashes": frozen, then force-deleted (no preStop, no drain).
    sidecar = container_status(kube.pod(d.namespace, holder), "consul-registrar")
    stop_container(sidecar["containerID"])
    began = time.monotonic()
    kube.run("-n", d.namespace, "delete", "pod", holder, "--grace-period=0", "--force", "--wait=false")
    bound = 2 * SESSION_TTL + 1 + KUBELET_SLACK
    reaped_after = None
    while time.monotonic() - began < bound + SESSION_TTL:
        now_indexes = create_indexes()
        now = time.monotonic()
        for iid in peer_iids:
            assert now_indexes.get(iid) == before[iid], (
                f"{iid}, a live pod of the crashed holder's node, left Consul or was registered again "
                f"{now - began:.1f} s after the crash: CreateIndex {before[iid]} → {now_indexes.get(iid)}")
        if reaped_after is None and holder_iid not in now_indexes:
            reaped_after = now - began
        assert reaped_after is not None or now - began < bound, (
            f"the crashed holder's instance {holder_iid} still in Consul {now - began:.1f} s after the crash")
        time.sleep(0.2)
    figure("catalog_crashed_holder_reaped_after", reaped_after, "s")
    log(f"{holder_iid} (the holder) reaped {reaped_after:.1f} s after the crash; its peers {peer_iids} never moved")
    for iid in peer_iids:
        key = liveness_key(d.consul, d.service, node, iid)
        assert key and key.get("Session") and key["Session"] != shared, (
            f"{iid}'s key should be held by a live session now, not the crashed holder's: {key}")
    wait_for(f"a pod of {k8s_node} holds its shared session again",
             lambda: holder_session(d.consul, node) not in (None, shared), 3 * SESSION_TTL, 0.5)
    wait_for("the replacement pod registered: all passing", lambda: d.all_passing(REPLICAS), 120)
