"""The three routes of docs/add-to-a-workload.md, followed from a clean checkout: the
files git knows (tracked, or new and not ignored; never build outputs, vendored chart archives or
Chart.lock files) copied to an empty directory, symlinks kept, then the commands the page gives.
A route that works only thanks to a leftover file in the developer's tree fails here."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import podspec
from conftest import REPO, k8s_versions, one, parse
from k8s_schemas import assert_valid


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    root = tmp_path_factory.mktemp("clean-checkout")
    for name in filter(None, listed):
        if not name.startswith(("charts/", "deploy/", "examples/charts/")):
            continue
        source, target = REPO / name, root / name
        if not os.path.lexists(source):
            continue  # deleted in the working tree
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)
    return root


def run(*args: str, cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def test_route_1_the_chart(checkout):
    helm = os.environ["HELM_BIN"]
    for files in (["ci/user-values.yaml"], ["ci/user-values.yaml", "ci/statefulset-values.yaml"], ["ci/demo-values.yaml"]):
        args = [helm, "template", "shop", "charts/consul-registrar"]
        for f in files:
            args += ["-f", f"charts/consul-registrar/{f}"]
        docs = parse(run(*args, cwd=checkout))
        assert_valid(docs, k8s_versions())
        workload = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet"))
        podspec.check_sidecar(podspec.pod_spec(workload), native=files[-1] != "ci/statefulset-values.yaml")


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_route_2_the_library_in_an_existing_chart(checkout, kind):
    helm = os.environ["HELM_BIN"]
    run(helm, "dependency", "build", "examples/charts/my-app", cwd=checkout)
    docs = parse(run(helm, "template", "shop", "examples/charts/my-app", "--set", f"kind={kind}", cwd=checkout))
    assert_valid(docs, k8s_versions())
    spec = podspec.pod_spec(one(docs, kind))
    facts = podspec.check_sidecar(spec, native=True)
    podspec.check_drain_token(docs, spec, facts["sidecar"], facts["admin_port"])


@pytest.mark.parametrize("overlay, kind", [("deploy/overlays/example", "Deployment"),
                                           ("deploy/overlays/example-statefulset", "StatefulSet")])
def test_route_3_the_kustomize_component(checkout, overlay, kind):
    docs = parse(run(os.environ["KUSTOMIZE_BIN"], "build", overlay, cwd=checkout))
    assert_valid(docs, k8s_versions())
    spec = podspec.pod_spec(one(docs, kind))
    facts = podspec.check_sidecar(spec, native=True)
    podspec.check_drain_token(docs, spec, facts["sidecar"], facts["admin_port"])
