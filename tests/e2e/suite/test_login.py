"""Issue 23 on a real cluster: no static token in the pod. A Consul dev server with ACLs on
(`default_policy = "deny"`, namespace `consul-acl`) and the `kubernetes` auth method pointed at
this cluster's API server (a reviewer service account bound to `system:auth-delegator`), with the
binding rules docs/acl-login.md prints for catalog mode: `bind_type: service` named after the
pod's service account, and a policy for the virtual node, sessions and liveness keys. The chart
is installed with `consul.login` and no token:

1. every pod logs in (one login token per pod, its meta naming the pod), registers, follows a
   flip; a rollout under traffic loses no RPC; after the release is gone no login token is left
   (tokens counted before and after);
2. a pod whose service account is not named after its service gets a clear refusal naming
   `service:write` (the registration transaction's 409, reported as permission denied) and
   registers nothing.

Run alone: `E2E_TESTS=tests/e2e/suite/test_login.py bash tests/e2e/run.sh local`.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Callable, Iterator

import pytest

from conftest import Consul, Demo, Helm, Kube, _demo_releases, log, wait_for
from test_scenarios import REPLICAS, pod_names, rollout_under_traffic

NAMESPACE = "consul-acl"
MANAGEMENT = "8f2c1e4a-6b3d-4e5f-9a7b-0c1d2e3f4a5b"
METHOD = "k8s-auth-method"
ADDRESS = f"consul.{NAMESPACE}.svc.cluster.local:8500"
LOGIN_VALUES = {"consul": {"address": f"http://{ADDRESS}", "login": {"authMethod": METHOD}}}
CATALOG_POLICY = """
node_prefix "consul-registrar-" { policy = "write" }
session_prefix "consul-registrar-" { policy = "write" }
key_prefix "consul-registrar/instances/" { policy = "write" }
node_prefix "" { policy = "read" }
service_prefix "" { policy = "read" }
"""


class ACLConsul(Consul):
    """Consul's API through the port-forward, every call with the management token."""

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 10):
        for attempt in (1, 2):
            if self.proc is None or self.proc.poll() is not None:
                self._forward()
            req = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"X-Consul-Token": MANAGEMENT})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as response:
                    text = response.read()
                    return json.loads(text) if text.strip() else None
            except urllib.error.HTTPError:
                raise
            except (OSError, ValueError):
                if attempt == 2:
                    raise
                self.close()

    def get(self, path: str, timeout: float = 5):
        return self.request("GET", path, timeout=timeout)

    def put(self, path: str, body: dict):
        return self.request("PUT", path, body)

    def login_tokens(self) -> list[dict]:
        return self.get(f"/v1/acl/tokens?authmethod={METHOD}") or []


def consul_with_acls() -> list[dict]:
    """A dev server with ACLs on, its Service, and the auth method's reviewer service account."""
    labels = {"app.kubernetes.io/name": "consul-acl"}
    hcl = ('acl { enabled = true default_policy = "deny" enable_token_persistence = false '
           f'tokens {{ initial_management = "{MANAGEMENT}" agent = "{MANAGEMENT}" }} }}')
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "consul-auth-method"}},
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
         "metadata": {"name": "consul-auth-method",
                      "annotations": {"kubernetes.io/service-account.name": "consul-auth-method"}}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "consul-acl-auth-method-reviewer"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
         "subjects": [{"kind": "ServiceAccount", "name": "consul-auth-method", "namespace": NAMESPACE}]},
        # Consul's kubernetes method also reads the pod's ServiceAccount (its annotations): the
        # reviewer needs `get serviceaccounts` besides system:auth-delegator.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "consul-acl-auth-method-sa-reader"},
         "rules": [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "consul-acl-auth-method-sa-reader"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "consul-acl-auth-method-sa-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "consul-auth-method", "namespace": NAMESPACE}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "consul", "labels": labels},
         "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "automountServiceAccountToken": False,
                      "securityContext": {"runAsNonRoot": True, "runAsUser": 100, "runAsGroup": 1000,
                                          "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                      "containers": [{
                          "name": "consul", "image": "consul:1.22.3", "imagePullPolicy": "IfNotPresent",
                          "command": ["consul", "agent", "-dev", "-client=0.0.0.0", "-bind=$(POD_IP)",
                                      "-log-level=info", f"-hcl={hcl}"],
                          "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                          "ports": [{"name": "http", "containerPort": 8500}],
                          "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 2},
                          "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                              "capabilities": {"drop": ["ALL"]}},
                          "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                      }],
                      "volumes": [{"name": "tmp", "emptyDir": {}}],
                  }}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "consul", "labels": labels},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 8500, "targetPort": "http"}]}},
    ]


@pytest.fixture(scope="module")
def acl_consul(kube: Kube) -> Iterator[ACLConsul]:
    """Consul with ACLs, the kubernetes auth method on this cluster's API server, the binding rules
    of docs/acl-login.md for catalog mode, and anonymous reads for the Go client's resolver."""
    kube.create_namespace(NAMESPACE)
    kube.apply(consul_with_acls(), NAMESPACE)
    kube.run("-n", NAMESPACE, "rollout", "status", "deployment/consul", "--timeout=180s", timeout=200)
    c = ACLConsul(kube, service="consul", namespace=NAMESPACE)
    wait_for("Consul with ACLs has a leader", lambda: c.get("/v1/status/leader"), 60, 1)
    wait_for("the reviewer's token", lambda: kube.json("-n", NAMESPACE, "get", "secret", "consul-auth-method")
             .get("data", {}).get("token"), 60, 1)
    secret = kube.json("-n", NAMESPACE, "get", "secret", "consul-auth-method")["data"]
    c.put("/v1/acl/auth-method", {
        "Name": METHOD, "Type": "kubernetes",
        "Config": {"Host": "https://kubernetes.default.svc",
                   "CACert": base64.b64decode(secret["ca.crt"]).decode(),
                   "ServiceAccountJWT": base64.b64decode(secret["token"]).decode()}})
    c.put("/v1/acl/binding-rule", {"AuthMethod": METHOD, "BindType": "service",
                                   "BindName": "${serviceaccount.name}", "Selector": "serviceaccount.name!=default"})
    c.put("/v1/acl/policy", {"Name": "consul-registrar-catalog", "Rules": CATALOG_POLICY})
    c.put("/v1/acl/binding-rule", {"AuthMethod": METHOD, "BindType": "policy",
                                   "BindName": "consul-registrar-catalog", "Selector": "serviceaccount.name!=default"})
    c.put("/v1/acl/policy", {"Name": "anonymous-read",
                             "Rules": 'service_prefix "" { policy = "read" }\nnode_prefix "" { policy = "read" }'})
    c.put("/v1/acl/token/00000000-0000-0000-0000-000000000002",
          {"Description": "Anonymous Token", "Policies": [{"Name": "anonymous-read"}]})
    log(f"Consul {c.get('/v1/agent/self')['Config']['Version']} with ACLs and the kubernetes auth method {METHOD}")
    yield c
    c.close()
    kube.delete_namespace(NAMESPACE, wait=False)
    kube.run("delete", "clusterrolebinding", "consul-acl-auth-method-reviewer", "consul-acl-auth-method-sa-reader",
             "--ignore-not-found", check=False)
    kube.run("delete", "clusterrole", "consul-acl-auth-method-sa-reader", "--ignore-not-found", check=False)


@pytest.fixture
def login_demo(request, kube: Kube, helm: Helm, acl_consul: ACLConsul) -> Iterator[Callable[..., Demo]]:
    """`demo` in catalog mode against the Consul with ACLs, logging in (LOGIN_VALUES)."""
    yield from _demo_releases(request, kube, helm, acl_consul, catalog=True)


def test_pods_log_in_register_roll_and_leave_no_token(login_demo, kube: Kube, acl_consul: ACLConsul):
    before = acl_consul.login_tokens()
    d = login_demo(LOGIN_VALUES)
    wait_for("every pod logged in and passing", lambda: d.all_passing(REPLICAS), 180)
    tokens = [t for t in acl_consul.login_tokens() if d.namespace in t.get("Description", "")]
    assert len(tokens) == REPLICAS, f"one login token per pod: {[t.get('Description') for t in tokens]}"
    for name in pod_names(d):
        assert any(name in t["Description"] for t in tokens), f"no login token names pod {name}"
        logs = kube.logs(d.namespace, name, "consul-registrar")
        assert "logged in to Consul" in logs, logs
        secrets = [acl_consul.get(f"/v1/acl/token/{t['AccessorID']}")["SecretID"] for t in tokens]
        assert not any(s in logs for s in secrets), "a login token in the sidecar's log"
    victim = pod_names(d)[0]
    d.flip(victim, "not-serving")
    wait_for("the flip to critical", lambda: d.instances()[d.instance_id(victim)].status == "critical", 30, 0.5)
    d.flip(victim, "serving")
    wait_for("back to passing", lambda: d.all_passing(REPLICAS), 30, 0.5)

    rollout_under_traffic(d, kube, "login", True, consul_address=ADDRESS)
    wait_for("one login token per pod after the rollout (the old pods logged out)", lambda: len(
        [t for t in acl_consul.login_tokens() if d.namespace in t.get("Description", "")]) == REPLICAS, 60, 1)

    kube.delete_namespace(d.namespace)
    wait_for("no instance left", lambda: not d.instances(), 60, 0.5)
    wait_for("no login token left after the release is gone",
             lambda: len(acl_consul.login_tokens()) == len(before), 60, 1)


def test_a_service_the_identity_may_not_write_is_refused_clearly(login_demo, kube: Kube, acl_consul: ACLConsul):
    d = login_demo({**LOGIN_VALUES, "serviceAccount": {"name": "someone-else"}}, wait=False)
    wait_for("a pod", lambda: pod_names(d), 120, 1)
    pod = pod_names(d)[0]
    def refused() -> bool:
        logs = kube.logs(d.namespace, pod, "consul-registrar")
        return "(HTTP 409, permission denied" in logs and "lacks permission 'service:write'" in logs

    wait_for("the refusal naming service:write in the sidecar's log", refused, 120, 1)
    assert "logged in to Consul" in kube.logs(d.namespace, pod, "consul-registrar")
    assert not d.instances(), "an instance was registered"
    assert not acl_consul.get(f"/v1/catalog/service/{d.service}")
