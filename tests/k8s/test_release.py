"""`make release`'s charts (scripts/release.sh --charts-only, exactly as the release packages
them): the packaged chart renders what the source chart renders for every test variant, the
packaged library what the source library renders for a team's chart, and the Helm repository
index lists both with their digests. The SBOM (scripts/sbom.py) lists exactly the crates cargo
links into the binary. Cheap: no image is built here (`make release` builds them). Run through
`bash scripts/check-k8s.sh`."""

import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import CHART, EXAMPLE_CHART, LIBRARY, REPO
import test_chart


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release") / "charts"
    result = subprocess.run(["bash", "scripts/release.sh", "--charts-only", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


def chart_file(packaged: Path, chart: Path) -> Path:
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    path = packaged / f"{meta['name']}-{meta['version']}.tgz"
    assert path.exists(), f"{path.name} not packaged: {sorted(p.name for p in packaged.iterdir())}"
    return path


def test_the_index_lists_both_charts_with_their_digests(packaged):
    index = yaml.safe_load((packaged / "index.yaml").read_text())
    for chart in (CHART, LIBRARY):
        path = chart_file(packaged, chart)
        meta = yaml.safe_load((chart / "Chart.yaml").read_text())
        [entry] = index["entries"][meta["name"]]
        assert entry["version"] == meta["version"]
        assert entry["digest"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["urls"] == [path.name]


def test_the_packaged_chart_carries_the_library_and_the_dashboard(packaged):
    with tarfile.open(chart_file(packaged, CHART)) as tar:
        names = set(tar.getnames())
    assert "consul-registrar/charts/consul-registrar-lib/templates/_sidecar.tpl" in names
    assert "consul-registrar/dashboards/consul-registrar.json" in names
    assert "consul-registrar/values.schema.json" in names


@pytest.mark.parametrize("variant", list(test_chart.VARIANTS))
def test_the_packaged_chart_renders_as_the_source(helm, packaged, variant):
    values, files = test_chart.variant_values(variant)
    # A fixed drain token (a generated one differs per render), and the optional objects on.
    extra = [{"prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True},
              "drainToken": {"value": test_chart.TOKEN}}]
    source = helm.template(*values, *extra, files=files)
    package = helm.template(*values, *extra, files=files, chart=chart_file(packaged, CHART))
    assert package == source


def test_the_packaged_library_renders_a_teams_chart_as_the_source(helm, packaged, tmp_path):
    token = {"consulRegistrar": {"drainToken": {"value": test_chart.TOKEN}}}
    from_source = helm.template(token, chart=helm.example_chart())
    copy = tmp_path / "my-app"
    shutil.copytree(EXAMPLE_CHART, copy, ignore=shutil.ignore_patterns("*.tgz", "Chart.lock"))
    (copy / "charts").mkdir(exist_ok=True)
    shutil.copy(chart_file(packaged, LIBRARY), copy / "charts")
    assert helm.template(token, chart=copy) == from_source


def test_the_sbom_lists_the_crates_of_the_binary(tmp_path):
    host = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    target = next(l.split(": ", 1)[1] for l in host.splitlines() if l.startswith("host: "))
    sbom = json.loads(subprocess.run(["python3", "scripts/sbom.py", "--target", target], cwd=REPO, check=True,
                                     capture_output=True, text=True).stdout)
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.5"
    root = sbom["metadata"]["component"]
    cargo_toml = (REPO / "Cargo.toml").read_text()
    assert f'version = "{root["version"]}"' in cargo_toml and root["name"] == "consul-registrar"
    tree = subprocess.run(["cargo", "tree", "--locked", "-e", "normal", "--target", target, "-p", "consul-registrar",
                           "--prefix", "none", "--format", "{p}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout
    linked = {tuple(line.split(" (")[0].split(" v", 1)) for line in tree.splitlines() if line.strip()}
    linked.discard(("consul-registrar", root["version"]))
    listed = {(c["name"], c["version"]) for c in sbom["components"]}
    assert listed == linked, f"only in the SBOM: {listed - linked}; only in cargo tree: {linked - listed}"
    assert all(c.get("hashes") and c["purl"] == f"pkg:cargo/{c['name']}@{c['version']}" for c in sbom["components"])
    refs = {c["bom-ref"] for c in sbom["components"]} | {root["bom-ref"]}
    assert all(d["ref"] in refs and set(d["dependsOn"]) <= refs for d in sbom["dependencies"])
