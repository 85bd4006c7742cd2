"""The kustomize route (deploy/): the Component deploy/components/consul-registrar added to
workloads the examples did not write (deploy/examples/*, a team's own manifests), through the
example overlays. Each build validates strictly against the Kubernetes schemas, its pods carry
what the sidecar contract needs (podspec.py), the Component's sidecar is the library's, and it
touches only the workloads that opt in. Run through `bash scripts/check-k8s.sh`."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import podspec
from conftest import CHART, COMPONENT, DEPLOY, POD_ENV, REPO, k8s_versions, manifest_of, one, registered_instance, validate_manifest
from k8s_schemas import assert_valid

BUILDS = ["overlays/example", "overlays/example-statefulset", "overlays/example-catalog", "consul-dev",
          "consul-dev/servers-only", "examples/hello-app", "examples/hello-statefulset"]
OVERLAYS = {"overlays/example": "Deployment", "overlays/example-statefulset": "StatefulSet",
            "overlays/example-catalog": "Deployment"}
# Each overlay's drain token and the Consul it talks to (the kustomization that runs it).
OVERLAY_CONSUL = {
    "overlays/example": ("hello-demo-drain-token-not-secret", "consul-dev"),
    "overlays/example-statefulset": ("hello-demo-drain-token-not-secret", "consul-dev"),
    "overlays/example-catalog": ("hello-catalog-drain-token-not-secret", "consul-dev/servers-only"),
}


def http_service_address(kustomize, build: str) -> str:
    """http://<Service>.<namespace>.svc.cluster.local:<port> of the HTTP Service of a Consul layout
    (the non-headless one)."""
    [service] = [d for d in kustomize(DEPLOY / build) if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"]
    return (f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:"
            f"{service['spec']['ports'][0]['port']}")


@pytest.mark.parametrize("build", BUILDS)
def test_build_is_valid_kubernetes(kustomize, build):
    assert_valid(kustomize(DEPLOY / build), k8s_versions())


@pytest.mark.parametrize("build", list(OVERLAYS))
def test_pod_spec_has_what_the_sidecar_needs(kustomize, build):
    docs = kustomize(DEPLOY / build)
    workload = one(docs, OVERLAYS[build])
    spec = podspec.pod_spec(workload)
    facts = podspec.check_sidecar(spec, native=True)
    token = podspec.check_drain_token(docs, spec, facts["sidecar"], facts["admin_port"])
    expected_token, consul = OVERLAY_CONSUL[build]
    assert token == expected_token
    podspec.check_security(spec)
    manifest = manifest_of(docs, facts["config_map"], facts["key"])
    podspec.check_grace(spec, manifest["drain"])
    assert manifest["admin"]["address"] == podspec.flag(facts["sidecar"]["args"], "--admin-addr")
    assert [s["name"] for s in manifest["services"]] == ["hello"], "the overlay's manifest replaced the placeholder"
    # configMapGenerator's hash suffix rolls the pods when the manifest changes.
    assert re.fullmatch(r"consul-registrar-manifest-[a-z0-9]{10}", facts["config_map"]), facts["config_map"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    assert facts["env"]["CONSUL_HTTP_ADDR"]["value"] == http_service_address(kustomize, consul)
    assert "part-of" not in json.dumps(docs), "nothing stamps part-of on the team's app"
    if manifest.get("consul", {}).get("mode") == "catalog":
        podspec.check_catalog_mode(manifest, facts["env"])


def test_overlay_runs_the_demo_against_the_consul_dev_server(kustomize):
    docs = kustomize(DEPLOY / "overlays" / "example")
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["name"] == "hello" and deployment["metadata"]["namespace"] == "hello-demo"
    assert deployment["spec"]["replicas"] == 3
    spec = podspec.pod_spec(deployment)
    facts = podspec.check_sidecar(spec, native=True)
    service = one(kustomize(DEPLOY / "consul-dev"), "Service")
    expected = (f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:"
                f"{service['spec']['ports'][0]['port']}")
    assert facts["env"]["CONSUL_HTTP_ADDR"]["value"] == expected
    # The same locally built images as the chart's demo values.
    demo = (CHART / "ci" / "demo-values.yaml").read_text()
    for container in [facts["sidecar"], *podspec.app_containers(spec)]:
        repository, tag = container["image"].rsplit(":", 1)
        assert f"repository: {repository}\n" in demo and f"tag: {tag}\n" in demo, container["image"]
        assert container["imagePullPolicy"] == "Never"
    assert spec["terminationGracePeriodSeconds"] == 20


def comparable(container: dict) -> dict:
    """A sidecar without what legitimately differs between a Component build and a chart render:
    the image, the log format, the Consul address and the drain token Secret's name."""
    c = json.loads(json.dumps(container))
    c.pop("image")
    c["args"] = [a for a in c["args"] if a not in ("human", "json")]
    c["env"] = [e for e in c["env"] if e["name"] not in ("CONSUL_HTTP_ADDR", podspec.DRAIN_TOKEN_ENV)]
    c.pop("imagePullPolicy")
    return c


def test_component_sidecar_is_the_charts(helm, kustomize):
    """The Component is YAML, not templates: it must stay equal to what the library renders with
    its defaults, or the two routes drift apart."""
    chart = podspec.pod_spec(one(helm.template({
        "app": {"image": {"repository": "x", "tag": "1"}},
        "manifest": {"services": [{"name": "hello", "port": 50051}]},
        "drainToken": {"value": "0123456789abcdef"},
    }), "Deployment"))
    overlay = podspec.pod_spec(one(kustomize(DEPLOY / "overlays" / "example"), "Deployment"))
    assert comparable(podspec.sidecar_of(overlay, True)) == comparable(podspec.sidecar_of(chart, True))
    chart_hook = podspec.app_containers(chart)[0]["lifecycle"]["preStop"]["httpGet"]
    overlay_hook = podspec.app_containers(overlay)[0]["lifecycle"]["preStop"]["httpGet"]
    assert {**chart_hook, "httpHeaders": None} == {**overlay_hook, "httpHeaders": None}
    component = yaml.safe_load((COMPONENT / "sidecar.yaml").read_text())
    [sidecar] = component["spec"]["template"]["spec"]["initContainers"]
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert sidecar["image"] == f"ghcr.io/consul-registrar/consul-registrar:{app_version}", "the chart's release"
    [chart_volume] = [v for v in chart["volumes"] if v["name"] == "consul-registrar-manifest"]
    [overlay_volume] = [v for v in overlay["volumes"] if v["name"] == "consul-registrar-manifest"]
    assert chart_volume["configMap"]["items"] == overlay_volume["configMap"]["items"]


def test_catalog_overlay_is_the_example_in_catalog_mode(helm, kustomize):
    """overlays/example-catalog: the example's Deployment and the same Component, with only the
    manifest's mode (no agent-only check fields) and the sidecar's address changed — to the
    servers-only layout's Service; its sidecar is the one the chart renders in catalog mode."""
    catalog = kustomize(DEPLOY / "overlays" / "example-catalog")
    agent = kustomize(DEPLOY / "overlays" / "example")
    deployment = one(catalog, "Deployment")
    assert deployment["metadata"]["namespace"] == "hello-catalog" and deployment["spec"]["replicas"] == 3
    spec = podspec.pod_spec(deployment)
    facts = podspec.check_sidecar(spec, native=True)
    manifest = manifest_of(catalog, facts["config_map"], facts["key"])
    assert manifest["consul"]["mode"] == "catalog"
    agent_facts = podspec.check_sidecar(podspec.pod_spec(one(agent, "Deployment")), native=True)
    agent_manifest = manifest_of(agent, agent_facts["config_map"], agent_facts["key"])
    without_mode = json.loads(json.dumps(manifest))
    without_mode.pop("consul")
    for service in agent_manifest["services"]:
        for field in podspec.AGENT_ONLY_CHECK_FIELDS:
            service.get("check", {}).pop(field, None)
        if service.get("check") == {}:
            service.pop("check")
    assert without_mode == agent_manifest, "the catalog overlay's manifest is the example's but for the mode"
    assert facts["env"]["CONSUL_HTTP_ADDR"]["value"] == http_service_address(kustomize, "consul-dev/servers-only")
    chart = podspec.pod_spec(one(helm.template({
        "app": {"image": {"repository": "x", "tag": "1"}},
        "consul": {"mode": "catalog", "address": "http://consul-server.consul.svc:8500"},
        "manifest": {"services": [{"name": "hello", "port": 50051}]},
        "drainToken": {"value": "0123456789abcdef"},
    }), "Deployment"))
    assert comparable(facts["sidecar"]) == comparable(podspec.sidecar_of(chart, True))


def test_servers_only_consul_has_servers_behind_a_service_and_no_agent(kustomize):
    """consul-dev/servers-only, consul-k8s's agentless layout: no client-agent DaemonSet, three
    servers started one after the other that find each other through the headless Service and
    expect exactly the StatefulSet's replicas, and the Service consul-server in front of them."""
    docs = kustomize(DEPLOY / "consul-dev" / "servers-only")
    assert "DaemonSet" not in [d["kind"] for d in docs], "no client agent"
    assert not [d for d in docs if d["kind"] == "Deployment"], "no dev server"
    sts = one(docs, "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    replicas = sts["spec"]["replicas"]
    # OrderedReady: servers started at once each resolve only themselves, join themselves, stop retrying.
    assert replicas == 3 and sts["spec"].get("podManagementPolicy", "OrderedReady") == "OrderedReady"
    assert "-server" in command and "-dev" not in command
    assert f"-bootstrap-expect={replicas}" in command
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    namespace = sts["metadata"]["namespace"]
    joins = sorted(a.split("=", 1)[1].replace("$(POD_NAMESPACE)", namespace) for a in command if a.startswith("-retry-join="))
    assert joins == [f"{sts['metadata']['name']}-{i}.{headless['metadata']['name']}.{namespace}.svc.cluster.local"
                     for i in range(replicas)]
    server = services["consul-server"]
    assert namespace == server["metadata"]["namespace"] == "consul"
    # One server a node: a lost node must take at most one, or raft's quorum goes with it.
    pod = sts["spec"]["template"]["spec"]
    spreads = pod.get("topologySpreadConstraints") or []
    assert len(spreads) == 1, spreads
    spread = spreads[0]
    assert (spread["topologyKey"], spread["maxSkew"], spread["whenUnsatisfiable"]) == (
        "kubernetes.io/hostname", 1, "DoNotSchedule")
    assert spread["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert any(t["key"] == "node-role.kubernetes.io/control-plane" for t in pod.get("tolerations") or [])
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for service in (server, headless):
        assert service["spec"]["selector"].items() <= labels.items()
    assert not server["spec"].get("publishNotReadyAddresses"), "only servers that answer get clients"
    assert {p["port"] for p in server["spec"]["ports"]} == {8500}
    # The same pinned Consul as the dev server, and labels no Service or DaemonSet of ../ selects.
    dev = kustomize(DEPLOY / "consul-dev")
    assert container["image"] == one(dev, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    for other in dev:
        selector = other.get("spec", {}).get("selector", {})
        selector = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
        if selector:
            assert not selector.items() <= labels.items(), f"{other['kind']} {other['metadata']['name']} selects the servers"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/status/leader", "Ready without a leader (OrderedReady)"


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "DaemonSet", "Job"])
def test_component_adds_the_sidecar_only_to_workloads_that_opt_in(kustomize, tmp_path, kind):
    """A team's kustomization with two workloads of one kind, one labelled: only that one gets the
    sidecar; its own init containers, volumes and annotations stay."""
    shutil.copytree(COMPONENT, tmp_path / "component")
    pod = {
        "metadata": {"labels": {"app": "x"}, "annotations": {"team": "mine"}},
        "spec": {
            "initContainers": [{"name": "migrate", "image": "tool:1"}],
            "containers": [{"name": "main", "image": "app:1"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }
    if kind == "Job":
        pod["spec"]["restartPolicy"] = "Never"

    def workload(name: str, opt_in: bool) -> dict:
        labels = {"app": name, **({"consul-registrar.io/inject": "true"} if opt_in else {})}
        api = "batch/v1" if kind == "Job" else "apps/v1"
        spec = {"template": json.loads(json.dumps(pod))}
        if kind != "Job":
            spec["selector"] = {"matchLabels": {"app": "x"}}
        if kind == "StatefulSet":
            spec["serviceName"] = name
        return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "labels": labels}, "spec": spec}

    resources = [workload("mine", True), workload("theirs", False),
                 {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "consul-registrar-drain-token"},
                  "stringData": {"token": "team-token-0123456789"}}]
    (tmp_path / "app.yaml").write_text(yaml.safe_dump_all(resources))
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(
        {"admin": {"address": "0.0.0.0:9102"}, "drain": {"delay": "5s"}, "services": [{"name": "x", "port": 80}]}))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["app.yaml"], "components": ["component"],
        "configMapGenerator": [{"name": "consul-registrar-manifest", "files": ["manifest.yaml"]}],
    }))
    docs = kustomize(tmp_path)
    assert_valid(docs, k8s_versions())
    by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}
    mine, theirs = podspec.pod_spec(by_name["mine"]), podspec.pod_spec(by_name["theirs"])
    facts = podspec.check_sidecar(mine, native=True)
    assert podspec.check_drain_token(docs, mine, facts["sidecar"], facts["admin_port"]) == "team-token-0123456789"
    assert [c["name"] for c in mine["initContainers"]] == ["consul-registrar", "migrate"], "the sidecar first, the app's own kept"
    assert {v["name"] for v in mine["volumes"]} == {"data", "consul-registrar-manifest"}
    assert by_name["mine"]["spec"]["template"]["metadata"]["annotations"]["team"] == "mine"
    assert theirs == pod["spec"], "a workload without the label is left alone"


TEAM_TOKEN = "team-token-0123456789"
POST_START = {"exec": {"command": ["true"]}}


def team_overlay(tmp_path, workloads: list[dict]) -> Path:
    """A team's kustomization around its own workloads, with the drain-token Secret, the manifest
    generator and the Component (copied next to it: kustomize takes only relative paths)."""
    shutil.copytree(COMPONENT, tmp_path / "component")
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "consul-registrar-drain-token"},
              "stringData": {"token": TEAM_TOKEN}}
    (tmp_path / "app.yaml").write_text(yaml.safe_dump_all([*workloads, secret]))
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(
        {"admin": {"address": "0.0.0.0:9102"}, "drain": {"delay": "5s"}, "services": [{"name": "x", "port": 80}]}))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["app.yaml"], "components": ["component"],
        "configMapGenerator": [{"name": "consul-registrar-manifest", "files": ["manifest.yaml"]}],
    }))
    return tmp_path


def deployment(containers: list[dict], labels: dict | None = None, template_labels: dict | None = None,
               template_annotations: dict | None = None) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "ledger", "labels": {"app": "ledger", **(labels or {})}},
            "spec": {"selector": {"matchLabels": {"app": "ledger"}},
                     "template": {"metadata": {"labels": {"app": "ledger", **(template_labels or {})},
                                               "annotations": template_annotations or {}},
                                  "spec": {"containers": containers}}}}


def failed_build(path: Path) -> str:
    import os
    import subprocess
    result = subprocess.run([os.environ["KUSTOMIZE_BIN"], "build", str(path)], capture_output=True, text=True)
    assert result.returncode != 0, f"the build should have failed:\n{result.stdout}"
    return result.stderr


INJECT = {"consul-registrar.io/inject": "true"}
OWN_HOOK = {**INJECT, "consul-registrar.io/drain-hook": "manual"}


def drain_hook(token: str = "set-by-the-component") -> dict:
    """The preStop hook a team writes on its app container (docs/add-to-a-workload.md)."""
    return {"httpGet": {"path": "/drain?wait=true", "port": 9102,
                        "httpHeaders": [{"name": "X-Drain-Token", "value": token}]}}


def test_component_never_replaces_the_first_containers_lifecycle(tmp_path):
    """The default hook goes on the first container; if that container has a lifecycle of its
    own (a postStart, its own preStop), the build fails instead of dropping it."""
    error = failed_build(team_overlay(tmp_path, [deployment(
        [{"name": "ledger", "image": "app:1", "lifecycle": {"postStart": POST_START}}], labels=INJECT)]))
    assert "/spec/template/spec/containers/0/lifecycle" in error, error


def test_component_drains_the_app_container_the_team_names(kustomize, tmp_path):
    """With `consul-registrar.io/drain-hook: manual` the team writes the hook on its app container
    (here the second, with a postStart of its own); the Component fills in the drain token and
    touches no other container's lifecycle."""
    proxy = {"name": "proxy", "image": "proxy:1", "lifecycle": {"postStart": POST_START}}
    ledger = {"name": "ledger", "image": "app:1", "lifecycle": {"postStart": POST_START, "preStop": drain_hook()}}
    docs = kustomize(team_overlay(tmp_path, [deployment([proxy, ledger], labels=OWN_HOOK)]))
    assert_valid(docs, k8s_versions())
    spec = podspec.pod_spec(one(docs, "Deployment"))
    facts = podspec.check_sidecar(spec, native=True)
    by_name = {c["name"]: c for c in spec["containers"]}
    assert by_name["proxy"] == proxy, "the other container is left as it was"
    assert podspec.check_prestop(spec, facts["admin_port"], [by_name["ledger"]]) == [TEAM_TOKEN]
    assert by_name["ledger"]["lifecycle"]["postStart"] == POST_START


def test_component_refuses_a_workload_whose_own_hook_is_missing(tmp_path):
    """`drain-hook: manual` without a hook anywhere would leave the pod without a drain: a build
    error, not a pod that leaves Consul only after its app stopped."""
    error = failed_build(team_overlay(tmp_path, [deployment([{"name": "ledger", "image": "app:1"}], labels=OWN_HOOK)]))
    assert "X-Drain-Token" in error, error


def test_a_pod_template_label_or_annotation_alone_adds_nothing(kustomize, tmp_path):
    """kustomize selects a patch's targets by the resource's own labels and annotations, never by
    its pod template's (docs/add-to-a-workload.md says so): the opt-in must be on the workload."""
    workload = deployment([{"name": "ledger", "image": "app:1"}], template_labels=INJECT, template_annotations=INJECT)
    docs = kustomize(team_overlay(tmp_path, [workload]))
    assert one(docs, "Deployment") == workload


def test_component_without_a_manifest_or_a_drain_token_fails_the_build(tmp_path):
    """Forgetting the manifest or the token Secret is a build error, not a broken pod."""
    import subprocess
    import os
    shutil.copytree(COMPONENT, tmp_path / "component")
    (tmp_path / "app.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "a", "labels": {"consul-registrar.io/inject": "true"}},
        "spec": {"selector": {"matchLabels": {"a": "a"}}, "template": {"metadata": {"labels": {"a": "a"}},
                 "spec": {"containers": [{"name": "a", "image": "a"}]}}}}))
    (tmp_path / "manifest.yaml").write_text("services: []\n")

    def build(kustomization: dict) -> str:
        (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["app.yaml"], "components": ["component"], **kustomization}))
        result = subprocess.run([os.environ["KUSTOMIZE_BIN"], "build", str(tmp_path)], capture_output=True, text=True)
        assert result.returncode != 0, result.stdout
        return result.stderr

    assert "consul-registrar-manifest" in build({}), "no manifest: a build error"
    error = build({"configMapGenerator": [{"name": "consul-registrar-manifest", "files": ["manifest.yaml"]}]})
    assert "consul-registrar-drain-token" in error, "no drain token: a build error"


def test_consul_dev_server_runs_the_pinned_consul(kustomize):
    docs = kustomize(DEPLOY / "consul-dev")
    pinned = re.search(r'CONSUL_VERSION="\$\{CONSUL_VERSION:-([0-9.]+)\}"', (REPO / "scripts" / "consul.sh").read_text())
    assert pinned, "cannot find the pinned Consul version in scripts/consul.sh"
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    # The image scripts/images.sh builds from that Consul (tests/e2e loads it into the cluster).
    assert container["image"] == f"consul:{pinned.group(1)}"
    assert "-dev" in container["command"] and "-client=0.0.0.0" in container["command"]
    service = one(docs, "Service")
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_consul_dev_has_a_client_agent_at_the_sidecars_default_address(kustomize):
    docs = kustomize(DEPLOY / "consul-dev")
    agent = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    # The node's own address and port 8500: the chart's default `http://$(HOST_IP):8500`.
    assert agent["hostNetwork"] is True and agent["dnsPolicy"] == "ClusterFirstWithHostNet"
    container = agent["containers"][0]
    assert container["image"] == one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert "-client=$(HOST_IP)" in container["command"] and "-bind=$(HOST_IP)" in container["command"]
    service = one(docs, "Service")
    join = f"-retry-join={service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert join in container["command"]
    assert {"port": 8301, "protocol": "TCP"}.items() <= next(
        p for p in service["spec"]["ports"] if p["port"] == 8301 and p["protocol"] == "TCP").items()


@pytest.mark.parametrize("build", list(OVERLAYS))
def test_manifest_is_accepted_by_the_sidecar(kustomize, registrar_bin, tmp_path, build):
    docs = kustomize(DEPLOY / build)
    facts = podspec.check_sidecar(podspec.pod_spec(one(docs, OVERLAYS[build])), native=True)
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    registrations = validate_manifest(registrar_bin, config_map["data"][facts["key"]], tmp_path, POD_ENV)
    assert [registered_instance(r)["ID"] for r in registrations] == [f"hello.{POD_ENV['POD_NAMESPACE']}.{POD_ENV['POD_NAME']}"]
    assert all("Service" in r for r in registrations) == (build == "overlays/example-catalog")
