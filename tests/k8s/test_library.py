"""The library route: examples/charts/my-app, an existing app's chart that adds the sidecar to its
own workload with charts/consul-registrar-lib, built as a team builds it (`helm dependency
build` from a copy of the checkout) and rendered as a Deployment, a StatefulSet, a DaemonSet and a Job,
native and classic. Every render validates strictly, carries the sidecar contract (podspec.py),
and has the very sidecar the chart renders for the same settings: one source, no copy."""

import pytest
import yaml

import podspec
from conftest import CHART, EXAMPLE_CHART, LIBRARY, POD_ENV, RenderError, k8s_versions, manifest_of, one, validate_manifest
from k8s_schemas import assert_valid

TOKEN = "my-app-drain-token-0123456789"
KINDS = ["Deployment", "StatefulSet", "DaemonSet", "Job"]


@pytest.fixture(scope="module")
def example_chart(helm):
    return helm.example_chart()


def render(helm, chart, kind: str, native: bool = True, **more) -> list[dict]:
    registrar = {"native": native, "drainToken": {"value": TOKEN}, **more}
    return helm.template({"kind": kind, "consulRegistrar": registrar}, chart=chart, release="shop")


def workload(docs: list[dict], kind: str) -> dict:
    return one(docs, kind)


# A classic sidecar never exits, so a Job with one would never complete: Jobs are native only.
CASES = [(kind, native) for kind in KINDS for native in (True, False) if native or kind != "Job"]


@pytest.mark.parametrize("kind, native", CASES, ids=[f"{k}-{'native' if n else 'classic'}" for k, n in CASES])
def test_example_chart_renders_valid_kubernetes(helm, example_chart, kind, native):
    docs = render(helm, example_chart, kind, native)
    assert_valid(docs, k8s_versions())
    spec = podspec.pod_spec(workload(docs, kind))
    facts = podspec.check_sidecar(spec, native)
    assert podspec.check_drain_token(docs, spec, facts["sidecar"], facts["admin_port"]) == TOKEN
    podspec.check_security(spec)
    values = yaml.safe_load((EXAMPLE_CHART / "values.yaml").read_text())
    podspec.check_grace(spec, values["consulRegistrar"]["manifest"]["drain"], values["shutdownSeconds"])
    manifest = manifest_of(docs, facts["config_map"], facts["key"])
    assert [s["name"] for s in manifest["services"]] == ["my-app"]
    assert "checksum/manifest" in workload(docs, kind)["spec"]["template"]["metadata"]["annotations"]
    # The app's own containers are untouched but for the hook.
    [app] = podspec.app_containers(spec)
    assert app["name"] == "my-app" and set(app["lifecycle"]) == {"preStop"}
    assert one(docs, "Pod")["metadata"]["annotations"]["helm.sh/hook"] == "test"


def test_library_checks_guard_the_example_chart(helm, example_chart):
    with pytest.raises(RenderError, match="must be at least the drain delay"):
        render(helm, example_chart, "Deployment", terminationGracePeriodSeconds=5)
    with pytest.raises(RenderError, match="needs Kubernetes 1.29"):
        helm.template({"consulRegistrar": {"drainToken": {"value": TOKEN}}}, chart=example_chart,
                      kube_version="1.28")
    with pytest.raises(RenderError, match="image.tag must be a string"):
        render(helm, example_chart, "Deployment", image={"tag": 1.1})
    with pytest.raises(RenderError, match="set manifest.services"):
        render(helm, example_chart, "Deployment", manifest={"services": None})
    with pytest.raises(RenderError, match="manifest.readiness must be all, any or registered"):
        render(helm, example_chart, "Deployment", manifest={"readiness": "sometimes"})


SERVERS = "http://consul-server.consul.svc:8500"


@pytest.mark.parametrize("kind", ["DaemonSet", "StatefulSet"])
def test_catalog_mode_through_the_library(helm, example_chart, kind):
    """A team's own chart turns catalog mode on with consulRegistrar.consul.mode: the library
    writes it into the manifest, and its sidecar gets the servers' address and the Downward API
    the virtual node defaults to (a DaemonSet: one sidecar per node, each on its node's virtual
    node)."""
    docs = render(helm, example_chart, kind, consul={"mode": "catalog", "address": SERVERS})
    assert_valid(docs, k8s_versions())
    facts = podspec.check_sidecar(podspec.pod_spec(workload(docs, kind)), True)
    manifest = manifest_of(docs, facts["config_map"], facts["key"])
    assert manifest["consul"] == {"mode": "catalog", "catalog": {"sharedSession": {"advertise": "${POD_IP}:9102"}}}
    podspec.check_catalog_mode(manifest, facts["env"])


@pytest.mark.parametrize(
    "registrar, complaint",
    [
        ({"consul": {"catalog": {"node": "node-a"}}}, "consul.catalog.node is only read in catalog mode"),
        ({"consul": {"mode": "catalog", "address": SERVERS},
          "manifest": {"services": [{"name": "my-app", "port": 1, "check": {"ttl": "5s"}}]}},
         r"manifest.services\[0\].check.ttl is agent-only"),
        ({"consul": {"mode": "catalog", "address": ""}}, "set consul.address to them"),
        ({"consul": {"mode": "sidecar"}}, 'consul.mode must be agent or catalog, not "sidecar"'),
        ({"manifest": {"consul": {"mode": "catalog"}}}, "set consul.mode, not manifest.consul.mode"),
        ({"manifest": {"consul": {"catalog": {"node": "node-a"}}}}, "set consul.catalog, not manifest.consul.catalog"),
    ],
)
def test_library_refuses_mixed_modes(helm, example_chart, registrar, complaint):
    """The library has no values schema: its own checks are the only guard of a team's chart."""
    with pytest.raises(RenderError, match=complaint):
        render(helm, example_chart, "Deployment", **registrar)


def test_user_objects_replace_the_library_defaults(helm, example_chart):
    probe = {"tcpSocket": {"port": 9102}}
    docs = render(helm, example_chart, "Deployment", readinessProbe=probe, resources={"requests": {"cpu": "1m", "memory": "1Mi"}})
    sidecar = podspec.sidecar_of(podspec.pod_spec(workload(docs, "Deployment")), True)
    assert sidecar["readinessProbe"] == probe
    assert sidecar["resources"] == {"requests": {"cpu": "1m", "memory": "1Mi"}}
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz", "what the user did not set keeps its default"


def test_the_chart_and_the_example_render_the_same_sidecar(helm, example_chart):
    """The chart uses the library too: for the same settings its sidecar, hook and volumes are the
    example's, byte for byte (apart from the names derived from each release)."""
    settings = {"image": {"repository": "consul-registrar", "tag": "dev"},
                "consul": {"address": "http://consul.consul.svc.cluster.local:8500"},
                "manifest": {"drain": {"delay": "3s", "deregisterTimeout": "10s"},
                             "services": [{"name": "my-app", "port": 50051, "tags": ["grpc"],
                                           "health": {"address": "127.0.0.1", "service": "helloworld.Greeter"}}]}}
    example = podspec.pod_spec(workload(render(helm, example_chart, "Deployment"), "Deployment"))
    chart_values = {
        "fullnameOverride": "shop-my-app",
        "app": {"image": {"repository": "x", "tag": "1"}, "shutdownSeconds": 5},
        "sidecar": {"image": settings["image"]},
        "consul": settings["consul"],
        "manifest": settings["manifest"],
        "drainToken": {"value": TOKEN},
        "terminationGracePeriodSeconds": 20,
    }
    chart = podspec.pod_spec(one(helm.template(chart_values, chart=CHART, release="shop"), "Deployment"))
    assert podspec.sidecar_of(chart, True) == podspec.sidecar_of(example, True)
    assert chart["volumes"] == example["volumes"]
    assert podspec.app_containers(chart)[0]["lifecycle"] == podspec.app_containers(example)[0]["lifecycle"]


def test_library_chart_is_a_library_and_the_chart_depends_on_it():
    lib = yaml.safe_load((LIBRARY / "Chart.yaml").read_text())
    assert lib["type"] == "library"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert {"name": "consul-registrar-lib", "version": lib["version"], "repository": "file://../consul-registrar-lib"} in chart["dependencies"]
    linked = CHART / "charts" / "consul-registrar-lib"
    assert linked.is_symlink() and linked.resolve() == LIBRARY.resolve(), "the chart links the library, no copy"
    assert f'{{{{- define "consul-registrar-lib.appVersion" -}}}}{lib["appVersion"]}{{{{- end }}}}' in (LIBRARY / "templates" / "_config.tpl").read_text()
    assert chart["appVersion"] == lib["appVersion"]


def test_example_manifest_is_accepted_by_the_sidecar(helm, example_chart, registrar_bin, tmp_path):
    docs = render(helm, example_chart, "StatefulSet")
    facts = podspec.check_sidecar(podspec.pod_spec(workload(docs, "StatefulSet")), True)
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    registrations = validate_manifest(registrar_bin, config_map["data"][facts["key"]], tmp_path, POD_ENV)
    assert [r["Name"] for r in registrations] == ["my-app"]
