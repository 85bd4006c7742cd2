"""The plain manifests of deploy/ (kustomize): each build validates strictly against the
Kubernetes schemas, its pods carry what the sidecar contract needs (podspec.py), and the base keeps
the same shape as the Helm chart's defaults. Run through `bash scripts/check-k8s.sh`."""

import re

import pytest

import podspec
from conftest import CHART, DEPLOY, POD_ENV, REPO, k8s_versions, manifest_of, one, validate_manifest
from k8s_schemas import assert_valid

BUILDS = ["base", "overlays/example", "consul-dev"]


@pytest.mark.parametrize("build", BUILDS)
def test_build_is_valid_kubernetes(kustomize, build):
    assert_valid(kustomize(DEPLOY / build), k8s_versions())


@pytest.mark.parametrize("build", ["base", "overlays/example"])
def test_pod_spec_has_what_the_sidecar_needs(kustomize, build):
    docs = kustomize(DEPLOY / build)
    deployment = one(docs, "Deployment")
    spec = podspec.pod_spec(deployment)
    facts = podspec.check_sidecar(spec, native=True)
    podspec.check_prestop(spec, facts["admin_port"])
    podspec.check_security(spec)
    manifest = manifest_of(docs, facts["config_map"], facts["key"])
    podspec.check_grace(spec, manifest["drain"]["delay"])
    assert manifest["admin"]["address"] == podspec.flag(facts["sidecar"]["args"], "--admin-addr")
    # configMapGenerator's hash suffix rolls the pods when the manifest changes.
    assert re.fullmatch(r"hello-registrar-manifest-[a-z0-9]{10}", facts["config_map"]), facts["config_map"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_overlay_runs_the_demo_against_the_consul_dev_server(kustomize):
    docs = kustomize(DEPLOY / "overlays" / "example")
    deployment = one(docs, "Deployment")
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


def comparable(container: dict) -> dict:
    """A container without what legitimately differs between the chart and deploy/."""
    return {k: v for k, v in container.items() if k not in ("image", "volumeMounts")}


def test_base_has_the_shape_of_the_chart_defaults(helm, kustomize):
    chart = podspec.pod_spec(one(helm.template(), "Deployment"))
    base = podspec.pod_spec(one(kustomize(DEPLOY / "base"), "Deployment"))
    for key in ("securityContext", "terminationGracePeriodSeconds", "automountServiceAccountToken"):
        assert base.get(key) == chart.get(key), f"pod {key} differs from the chart's"
    assert comparable(podspec.sidecar_of(base, True)) == comparable(podspec.sidecar_of(chart, True))
    assert [comparable(c) for c in base["containers"]] == [comparable(c) for c in chart["containers"]]


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


@pytest.mark.parametrize("build", ["base", "overlays/example"])
def test_manifest_is_accepted_by_the_sidecar(kustomize, registrar_bin, tmp_path, build):
    docs = kustomize(DEPLOY / build)
    facts = podspec.check_sidecar(podspec.pod_spec(one(docs, "Deployment")), native=True)
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    registrations = validate_manifest(registrar_bin, config_map["data"][facts["key"]], tmp_path, POD_ENV)
    assert [r["ID"] for r in registrations] == [f"hello.{POD_ENV['POD_NAMESPACE']}.{POD_ENV['POD_NAME']}"]
