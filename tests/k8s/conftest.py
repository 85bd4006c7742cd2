"""Shared fixtures of the chart and deploy/ tests: the tools scripts/check-k8s.sh provides (paths
in HELM_BIN, KUSTOMIZE_BIN), the Kubernetes versions to validate against (K8S_VERSIONS), and
small helpers that render and parse. Run the suite through `bash scripts/check-k8s.sh`."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "consul-registrar"
LIBRARY = REPO / "charts" / "consul-registrar-lib"
EXAMPLE_CHART = REPO / "examples" / "charts" / "my-app"
DEPLOY = REPO / "deploy"
COMPONENT = DEPLOY / "components" / "consul-registrar"


def _tool(var: str) -> str:
    path = os.environ.get(var, "")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            f"{var} is not set to an executable ({path!r}): run these tests through "
            "`bash scripts/check-k8s.sh`, which provides the tools",
            pytrace=False,
        )
    return path


def k8s_versions() -> list[str]:
    return os.environ.get("K8S_VERSIONS", "1.29 1.37").split()


def parse(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


class RenderError(Exception):
    pass


class Helm:
    def __init__(self, binary: str, tmp: Path):
        self.binary = binary
        self.tmp = tmp
        self.count = 0

    def template(self, *values: dict, files=(), kube_version: str | None = None, chart: Path = CHART,
                 extra=(), release: str = "demo") -> list[dict]:
        """`helm template` with the given values (dicts, applied in order after `files`)."""
        args = [self.binary, "template", release, str(chart), "--namespace", "shop"]
        if kube_version:
            args += ["--kube-version", kube_version]
        for f in files:
            args += ["-f", str(f)]
        for v in values:
            self.count += 1
            path = self.tmp / f"values-{self.count}.yaml"
            path.write_text(yaml.safe_dump(v))
            args += ["-f", str(path)]
        args += list(extra)
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode != 0:
            raise RenderError(result.stderr.strip())
        return parse(result.stdout)

    def run(self, *args: str, cwd: Path | None = None) -> str:
        result = subprocess.run([self.binary, *args], capture_output=True, text=True, cwd=cwd)
        if result.returncode != 0:
            raise RenderError(result.stderr.strip())
        return result.stdout

    def checkout_copy(self, *paths: Path) -> Path:
        """A fresh copy of the given repository paths (same layout, symlinks followed) in a
        temporary directory, as a clean checkout has them; returns the copy's root."""
        self.count += 1
        root = self.tmp / f"checkout-{self.count}"
        for path in paths:
            shutil.copytree(path, root / path.relative_to(REPO), ignore=shutil.ignore_patterns("*.tgz", "Chart.lock"))
        return root

    def example_chart(self) -> Path:
        """examples/charts/my-app as a team builds it: `helm dependency build` against the library
        chart's path, in a copy of the checkout."""
        root = self.checkout_copy(EXAMPLE_CHART, LIBRARY)
        chart = root / EXAMPLE_CHART.relative_to(REPO)
        self.run("dependency", "build", str(chart))
        return chart

    def notes(self, *values: dict) -> str:
        """NOTES.txt as `helm install` would print it: `helm template` leaves it out, so render a
        copy of the chart where it is a named template included into a ConfigMap."""
        copy = self.tmp / f"notes-chart-{self.count}"
        self.count += 1
        shutil.copytree(CHART, copy)
        notes = (copy / "templates" / "NOTES.txt").read_text()
        (copy / "templates" / "NOTES.txt").unlink()
        (copy / "templates" / "_notes.tpl").write_text('{{- define "notes" -}}\n' + notes + "\n{{- end }}\n")
        (copy / "templates" / "notes.yaml").write_text(
            'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n'
            '  notes: {{ include "notes" . | toJson }}\n'
        )
        docs = self.template(*values, chart=copy)
        return next(d for d in docs if d["metadata"]["name"] == "notes")["data"]["notes"]


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    return Helm(_tool("HELM_BIN"), tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="session")
def kustomize():
    binary = _tool("KUSTOMIZE_BIN")

    def build(path: Path) -> list[dict]:
        result = subprocess.run([binary, "build", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"kustomize build {path} failed:\n{result.stderr}"
        return parse(result.stdout)

    return build


@pytest.fixture(scope="session")
def registrar_bin() -> str:
    """The consul-registrar binary (CONSUL_REGISTRAR_BIN), to check that rendered manifests are
    ones the sidecar accepts. scripts/check-k8s.sh finds a cargo-built one when it is unset."""
    path = os.environ.get("CONSUL_REGISTRAR_BIN", "")
    if not path:
        pytest.skip("CONSUL_REGISTRAR_BIN unset and no cargo-built consul-registrar found (cargo build)")
    if not os.access(path, os.X_OK):
        pytest.fail(f"CONSUL_REGISTRAR_BIN={path} is not executable", pytrace=False)
    return path


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def manifest_of(docs: list[dict], config_map: str, key: str) -> dict:
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    assert config_map in cms, f"the sidecar mounts ConfigMap {config_map}, which is not rendered ({list(cms)})"
    data = cms[config_map]["data"]
    assert key in data, f"ConfigMap {config_map} has no key {key} ({list(data)})"
    return yaml.safe_load(data[key])


def validate_manifest(binary: str, manifest_text: str, tmp: Path, env: dict) -> list[dict]:
    """`consul-registrar validate` on a manifest, with the pod's environment simulated."""
    path = tmp / "manifest.yaml"
    path.write_text(manifest_text)
    result = subprocess.run(
        [binary, "validate", "--manifest", str(path)],
        capture_output=True, text=True, env={"PATH": os.environ.get("PATH", ""), **env}, timeout=30,
    )
    assert result.returncode == 0, f"consul-registrar validate rejected the manifest:\n{result.stderr}\n{manifest_text}"
    return json.loads(result.stdout)


def registered_instance(registration: dict) -> dict:
    """The instance of one registration `consul-registrar validate` prints: an agent registration
    is the instance itself; a catalog one (catalog mode) holds it under `Service`, next to the
    virtual node (`Node`, `Address`: the node's) and the check. Checks the node's side against
    POD_ENV when it is a catalog registration."""
    if "Service" not in registration:
        return registration
    assert registration["Node"] == f"consul-registrar-{POD_ENV['NODE_NAME']}", registration["Node"]
    assert registration["Address"] == POD_ENV["HOST_IP"], "the virtual node sits at the node's IP"
    assert registration["NodeMeta"] == {"managed-by": "consul-registrar"}, registration["NodeMeta"]
    assert registration["Check"]["ServiceID"] == registration["Service"]["ID"], registration["Check"]
    return registration["Service"]


# The environment a pod gives the sidecar (Downward API), for `consul-registrar validate`.
POD_ENV = {
    "POD_IP": "10.244.1.7",
    "POD_NAME": "demo-consul-registrar-5d9c7-x2x8q",
    "POD_NAMESPACE": "shop",
    "POD_UID": "5b0e1a4c-7f7e-4d1e-9c55-2f3a8e6d9b10",
    "HOST_IP": "172.18.0.2",
    "NODE_NAME": "kind-worker",
    "CONSUL_HTTP_ADDR": "http://172.18.0.2:8500",
}
