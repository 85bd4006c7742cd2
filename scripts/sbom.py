#!/usr/bin/env python3
"""Prints a CycloneDX 1.5 SBOM (JSON) of the crates compiled into the consul-registrar binary:
the package's normal dependencies, transitively, for the build's target platform, each with its
version, package URL (pkg:cargo/NAME@VERSION), licence expression, and the SHA-256 of its .crate
from Cargo.lock, plus the dependency graph. Made from `cargo tree --locked -e normal` (features
resolved as the binary is built) with the standard library only; `make release` runs it.

  python3 scripts/sbom.py [--target TRIPLE]      # default: the host's (rustc -vV)

Reproducible: the timestamp is the last commit's (SOURCE_DATE_EPOCH when set), the serial number
a UUID derived from the package's version and Cargo.lock."""

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "consul-registrar"


def host_triple() -> str:
    out = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("host: "))


def cargo_tree(target: str) -> list[tuple[int, dict, bool]]:
    """`cargo tree` of the binary's package: its normal dependencies, with features resolved as
    cargo builds the binary (not unified with the tests' dev-dependencies, which `cargo metadata`
    does): (depth, package, already listed above)."""
    out = subprocess.run(
        ["cargo", "tree", "--locked", "-e", "normal", "--target", target, "-p", PACKAGE,
         "--prefix", "depth", "--format", "{p}\t{l}\t{r}"],
        capture_output=True, text=True, check=True, cwd=REPO).stdout
    rows = []
    for line in out.splitlines():
        depth = len(line) - len(line.lstrip("0123456789"))
        fields = line[depth:].split("\t")
        name, version = fields[0].split(" ")[:2]
        package = {"name": name, "version": version.lstrip("v"), "license": fields[1].strip(),
                   "repository": fields[2].replace("(*)", "").strip()}
        rows.append((int(line[:depth]), package, line.rstrip().endswith("(*)")))
    return rows


def purl(package: dict) -> str:
    return f"pkg:cargo/{package['name']}@{package['version']}"


def binary_crates(target: str) -> tuple[dict, list[dict], dict[str, list[str]]]:
    """The root package, the packages its binary links, and each one's dependencies (by purl)."""
    rows = cargo_tree(target)
    root = rows[0][1]
    crates: dict[str, dict] = {}
    edges: dict[str, set[str]] = {purl(root): set()}
    parents: list[str] = []
    for depth, package, _ in rows:
        ref = purl(package)
        del parents[depth:]
        if parents:
            edges.setdefault(parents[-1], set()).add(ref)
        edges.setdefault(ref, set())
        parents.append(ref)
        if depth > 0:
            crates[ref] = package
    ordered = sorted(crates.values(), key=lambda p: (p["name"], p["version"]))
    return root, ordered, {k: sorted(v) for k, v in edges.items()}


def lock_checksums() -> dict[tuple[str, str], str]:
    lock = tomllib.loads((REPO / "Cargo.lock").read_text())
    return {(p["name"], p["version"]): p["checksum"] for p in lock.get("package", []) if "checksum" in p}


def timestamp() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        result = subprocess.run(["git", "log", "-1", "--format=%ct"], capture_output=True, text=True, cwd=REPO)
        epoch = result.stdout.strip() or "0"
    when = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def component(package: dict, checksums: dict, kind: str = "library") -> dict:
    out = {"type": kind, "bom-ref": purl(package), "name": package["name"], "version": package["version"],
           "purl": purl(package)}
    if package.get("license"):
        out["licenses"] = [{"expression": package["license"]}]
    checksum = checksums.get((package["name"], package["version"]))
    if checksum:
        out["hashes"] = [{"alg": "SHA-256", "content": checksum}]
    if package.get("repository"):
        out["externalReferences"] = [{"type": "vcs", "url": package["repository"]}]
    return out


def sbom(target: str) -> dict:
    root, crates, edges = binary_crates(target)
    checksums = lock_checksums()
    lock_digest = hashlib.sha256((REPO / "Cargo.lock").read_bytes()).hexdigest()
    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"{purl(root)}?target={target}&lock={lock_digest}")
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{serial}",
        "version": 1,
        "metadata": {
            "timestamp": timestamp(),
            "tools": {"components": [{"type": "application", "name": "consul-registrar scripts/sbom.py"}]},
            "component": component(root, checksums, "application"),
            "properties": [{"name": "cdx:rust:target", "value": target}],
        },
        "components": [component(p, checksums) for p in crates],
        "dependencies": [{"ref": ref, "dependsOn": deps} for ref, deps in sorted(edges.items())],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help="target triple (default: the host's)")
    args = parser.parse_args()
    json.dump(sbom(args.target or host_triple()), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
