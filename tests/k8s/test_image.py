"""The Dockerfile, read as text (no Docker engine here; tests/e2e/kind builds it for real): the
targets the chart, deploy/ and the kind e2e rely on exist, the final stages are minimal and
non-root with an explicit ENTRYPOINT, and .dockerignore lets through everything that is copied."""

import re

import podspec
from conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def stages() -> dict[str, str]:
    """Stage name -> its instructions."""
    parts = re.split(r"^FROM\s+", DOCKERFILE, flags=re.M)[1:]
    named = {}
    for part in parts:
        header = part.splitlines()[0]
        match = re.search(r"\s+AS\s+(\S+)", header, re.I)
        assert match, f"unnamed stage: FROM {header}"
        named[match.group(1)] = part
    return named


def test_targets():
    names = list(stages())
    assert names[-1] == "consul-registrar", "the last stage is what `docker build .` produces: the sidecar"
    assert "demo-app" in names, "the kind e2e builds --target demo-app"
    assert "builder" in names


def test_final_stages_hold_one_binary_and_run_as_non_root():
    uid, gid = podspec.image_user()
    for name, binary in (("consul-registrar", "consul-registrar"), ("demo-app", "demo-app")):
        stage = stages()[name]
        assert stage.startswith("${DISTROLESS_IMAGE}"), f"{name} should start from the distroless base"
        copies = re.findall(r"^COPY\s+(.*)$", stage, re.M)
        assert copies == [f"--from=builder /out/{binary} /usr/local/bin/{binary}"], copies
        assert re.search(rf"^USER {uid}:{gid}$", stage, re.M), f"{name}: numeric USER {uid}:{gid}"
        assert re.search(rf'^ENTRYPOINT \["/usr/local/bin/{binary}"\]$', stage, re.M), f"{name}: exec-form ENTRYPOINT"
        for label in ("title", "description", "source", "licenses", "version", "revision"):
            assert f"org.opencontainers.image.{label}=" in stage, f"{name}: OCI label {label}"
        assert not re.search(r"^RUN\b", stage, re.M), f"{name}: a distroless stage has no shell to RUN in"
    assert re.search(r"^ARG DISTROLESS_IMAGE=gcr\.io/distroless/cc-debian12:nonroot$", DOCKERFILE, re.M)


def test_dependencies_are_built_before_the_sources_are_copied():
    builder = stages()["builder"]
    first_build = builder.index("cargo build")
    assert builder.index("COPY src") > first_build, "sources must be copied after the dependency build"
    assert "--locked" in builder


def test_dockerignore_lets_through_what_is_copied():
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for sources in re.findall(r"^COPY\s+(?!--from)(.*)\s+\S+$", DOCKERFILE, re.M):
        for source in sources.split():
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"
