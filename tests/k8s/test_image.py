"""The Dockerfile, read as text: the targets the chart, deploy/ and the e2e suites rely on exist;
each target compiles only its own binary; the version label is checked against Cargo.toml instead
of defaulting to a copy of it; the base images are pinned by digest with the update and
multi-architecture commands written down; the final stages are minimal and non-root with an
explicit ENTRYPOINT; prebuilt binaries can stand in for the builder (scripts/images.sh builds the
runtime stages that way with buildah, which is where they are built for real on this machine);
the demo workloads run the images that script builds; and .dockerignore lets through everything
that is copied."""

import pathlib
import re
import subprocess
import tomllib

import podspec
from conftest import CHART, DEPLOY, REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
CARGO = tomllib.loads((REPO / "Cargo.toml").read_text())
# (target, its binary, the cargo selection that builds it: its own workspace package only)
TARGETS = (
    ("consul-registrar", "consul-registrar", "-p consul-registrar --bin consul-registrar"),
    ("demo-app", "demo-app", "-p demo-app --bin demo-app"),
)
# The workspace members' directories, their manifests read here.
MEMBERS = {member: tomllib.loads((REPO / member / "Cargo.toml").read_text()) for member in CARGO["workspace"]["members"]}


def stages() -> dict[str, str]:
    """Stage name -> its FROM line's image and its instructions (comments dropped)."""
    text = "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#"))
    parts = re.split(r"^FROM\s+", text, flags=re.M)[1:]
    named = {}
    for part in parts:
        header = part.splitlines()[0]
        match = re.search(r"\s+AS\s+(\S+)", header, re.I)
        assert match, f"unnamed stage: FROM {header}"
        named[match.group(1)] = part
    return named


def base_of(stage: str) -> str:
    return stages()[stage].split()[0]


def arg_default(name: str) -> str | None:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    return match.group(1) if match else None


def cargo_builds(stage: str) -> list[str]:
    return re.findall(r"cargo build ([^&\\\n]*)", stages()[stage])


def copied(stage: str) -> list[str]:
    """The build-context paths a stage's COPY instructions take (not those from other stages)."""
    return [src.rstrip("/") for sources in re.findall(r"^COPY\s+(?!--from)(.*)\s+\S+$", stages()[stage], re.M) for src in sources.split()]


def placeholders(stage: str) -> set[str]:
    """The files a stage's RUN instructions create (`echo ... > FILE`, `touch FILE...`)."""
    runs = " ".join(re.findall(r"^RUN\s+((?:.*\\\n)*.*)$", stages()[stage], re.M))
    made = set(re.findall(r">\s*(\S+)", runs))
    for files in re.findall(r"\btouch\s+([^&\\\n]*)", runs):
        made.update(files.split())
    return made


def declared_targets(member: str) -> set[str]:
    """The source files of a member's library and binaries, relative to the repository root: the
    [lib] and [[bin]] paths its manifest declares, and the src/lib.rs and src/main.rs cargo finds
    by itself (testkit declares none: without its src/lib.rs cargo refuses the whole workspace)."""
    manifest = MEMBERS[member]
    paths = [manifest["lib"]["path"]] if "lib" in manifest else []
    paths += [b["path"] for b in manifest.get("bin", [])]
    paths += [auto for auto in ("src/lib.rs", "src/main.rs") if (REPO / member / auto).is_file()]
    return {str(pathlib.PurePosixPath(member) / path) for path in paths}


def test_targets():
    names = list(stages())
    assert names[-1] == "consul-registrar", "the last stage is what `docker build .` produces: the sidecar"
    assert "demo-app" in names, "the e2e suites build --target demo-app"


def test_each_target_compiles_only_its_own_binary():
    for target, binary, selection in TARGETS:
        # The runtime stage copies from <target>-binary, which is the compiled (or prebuilt) stage.
        assert base_of(f"{binary}-binary") == f"${{BINARIES}}-{binary}"
        builds = cargo_builds(f"compiled-{binary}")
        assert builds, f"compiled-{binary} runs no cargo build"
        for build in builds:
            assert build.split() == ["--release", "--locked", *selection.split()], (
                f"compiled-{binary}: `cargo build {build}` should build exactly {selection}"
            )
    # The sidecar's builder takes nothing of the demo app's package (a dev-dependency of the sidecar
    # only): not its sources, build script or proto, so no protoc runs for it.
    sidecar = stages()["compiled-consul-registrar"]
    assert not [p for p in copied("compiled-consul-registrar") if p.startswith("demo-app")], "the sidecar needs nothing of demo-app/"
    assert "demo-app" not in " ".join(cargo_builds("compiled-consul-registrar")), "the sidecar builder builds the demo app"
    assert "-p demo-app" not in sidecar and "--workspace" not in sidecar
    assert "cp target/release/demo-app /out/" in stages()["compiled-demo-app"]
    assert "cp target/release/consul-registrar /out/" in sidecar


def test_the_workspace_stage_holds_every_member_manifest_and_a_placeholder_per_declared_target():
    """cargo loads the whole workspace before it builds one package: every member's manifest must be
    there, and every source file a manifest declares (placeholders, so the dependency layer does
    not depend on the sources)."""
    workspace = copied("workspace")
    made = placeholders("workspace")
    assert {"Cargo.toml", "Cargo.lock"} <= set(workspace)
    for member in MEMBERS:
        manifest = str(pathlib.PurePosixPath(member) / "Cargo.toml")
        assert manifest in workspace, f"the workspace stage does not copy {manifest}"
        missing = {path.removeprefix("./") for path in declared_targets(member)} - made
        assert not missing, f"{member}: no placeholder for {sorted(missing)}"
    # The root package's main and the demo app's main are placeholders that compile.
    for main in ("src/main.rs", "demo-app/src/main.rs"):
        assert re.search(rf"echo 'fn main\(\) \{{\}}' > {re.escape(main)}", stages()["workspace"]), main
    # The demo app's build script and its proto are in its own dependency layer, before its sources.
    demo = stages()["compiled-demo-app"]
    assert {"demo-app/build.rs", "demo-app/proto"} <= set(copied("compiled-demo-app"))
    assert demo.index("COPY demo-app/proto") < demo.index("cargo build") < demo.index("COPY demo-app/src")
    assert (REPO / "demo-app" / "build.rs").is_file() and (REPO / "demo-app" / "proto").is_dir()


def test_dependencies_are_built_before_the_sources_are_copied():
    for _, binary, selection in TARGETS:
        stage = stages()[f"compiled-{binary}"]
        package = selection.split()[1]
        sources = "src" if package == CARGO["package"]["name"] else f"{package}/src"
        assert f"COPY {sources} ./{sources}" in stage, f"compiled-{binary} copies {sources}"
        assert stage.index(f"COPY {sources}") > stage.index("cargo build"), (
            f"compiled-{binary}: the dependency layer must be built before the sources are copied"
        )
        assert f"rm -rf target/release/.fingerprint/{package}-*" in stage, f"compiled-{binary}: {package} is rebuilt from its sources"
    assert not [p for p in copied("workspace") if p.endswith("src")], "the workspace stage copies sources"
    assert base_of("compiled-consul-registrar") == base_of("compiled-demo-app") == "workspace"


def test_version_label_comes_from_cargo_toml():
    # No stage defaults VERSION to a copy of Cargo.toml's version that could drift from it ...
    assert re.findall(r"^ARG VERSION\b(.*)$", DOCKERFILE, re.M), "VERSION is a build argument"
    assert all(not rest for rest in re.findall(r"^ARG VERSION\b(.*)$", DOCKERFILE, re.M)), "ARG VERSION has no default"
    # ... the builder refuses any other value than Cargo.toml's ...
    workspace = stages()["workspace"]
    check = re.search(r'want="\$\((.*?)\)"', workspace)
    assert check, "the workspace stage compares VERSION with Cargo.toml's version"
    assert workspace.index("COPY Cargo.toml") < check.start()
    assert re.search(r'"\$\{VERSION\}" != "\$want".*exit 1', workspace, re.S)
    # ... and that command, run here on the real Cargo.toml, gives Cargo.toml's version.
    got = subprocess.run(["bash", "-o", "pipefail", "-c", check.group(1)], cwd=REPO, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == CARGO["package"]["version"]
    # The label is the argument in both final stages.
    for target, _, _ in TARGETS:
        assert 'org.opencontainers.image.version="${VERSION}"' in stages()[target]


def test_base_images_are_pinned_by_digest():
    digest = r"@sha256:[0-9a-f]{64}"
    rust = arg_default("RUST_IMAGE")
    distroless = arg_default("DISTROLESS_IMAGE")
    assert rust and re.fullmatch(rf"rust:(\d+)\.(\d+)-slim-bookworm{digest}", rust), rust
    assert distroless and re.fullmatch(rf"gcr\.io/distroless/cc-debian12:nonroot{digest}", distroless), distroless
    assert base_of("workspace") == "${RUST_IMAGE}"
    # The builder's toolchain is at least the crate's minimum supported Rust.
    major, minor = map(int, re.match(r"rust:(\d+)\.(\d+)", rust).groups())
    msrv = tuple(map(int, CARGO["package"]["rust-version"].split(".")[:2]))
    assert (major, minor) >= msrv, f"{rust} is older than rust-version {CARGO['package']['rust-version']}"
    # Every FROM is a pinned argument, a stage of this file or scratch.
    for name, stage in stages().items():
        base = stage.split()[0]
        assert base.startswith("${") or base in stages() or base == "scratch", f"{name}: FROM {base} is not pinned"
    # How to move a pin, and how to build for several architectures, are written down.
    assert "docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot" in DOCKERFILE
    assert "skopeo inspect --raw docker://" in DOCKERFILE
    assert re.search(r"docker buildx build --platform linux/amd64,linux/arm64\b", DOCKERFILE)


def test_prebuilt_binaries_can_stand_in_for_the_builder():
    assert arg_default("BINARIES") == "compiled", "a plain `docker build` compiles"
    for _, binary, _ in TARGETS:
        stage = stages()[f"prebuilt-{binary}"]
        assert stage.split()[0] == "scratch"
        assert re.findall(r"^COPY\s+(.*)$", stage, re.M) == [f"--from=prebuilt {binary} /out/{binary}"]
    script = (REPO / "scripts" / "images.sh").read_text()
    for arg in ("--build-arg BINARIES=prebuilt", '--build-arg DISTROLESS_IMAGE="$BASE_CC"', "--build-context prebuilt="):
        assert arg in script, f"scripts/images.sh should build the Dockerfile with {arg}"
    # The host's cargo builds what the compiled-* stages would: the same package and binary each.
    for variable, (_, binary, selection) in zip(("REGISTRAR_CARGO", "DEMO_APP_CARGO"), TARGETS):
        match = re.search(rf"^{variable}=\((.*)\)$", script, re.M)
        assert match and match.group(1).split() == selection.split(), f"scripts/images.sh: {variable} should be ({selection})"
        assert f'cargo_build "${{{variable}[@]}}"' in script
        assert f'"$target_dir/release/{binary}"' in script, f"scripts/images.sh takes {binary} from target/release"


def test_final_stages_hold_one_binary_and_run_as_non_root():
    uid, gid = podspec.image_user()
    for target, binary, _ in TARGETS:
        stage = stages()[target]
        assert base_of(target) == "${DISTROLESS_IMAGE}", f"{target} should start from the distroless base"
        copies = re.findall(r"^COPY\s+(.*)$", stage, re.M)
        assert copies == [f"--from={binary}-binary /out/{binary} /usr/local/bin/{binary}"], copies
        assert re.search(rf"^USER {uid}:{gid}$", stage, re.M), f"{target}: numeric USER {uid}:{gid}"
        assert re.search(rf'^ENTRYPOINT \["/usr/local/bin/{binary}"\]$', stage, re.M), f"{target}: exec-form ENTRYPOINT"
        for label in ("title", "description", "source", "licenses", "version", "revision"):
            assert f"org.opencontainers.image.{label}=" in stage, f"{target}: OCI label {label}"
        assert not re.search(r"^RUN\b", stage, re.M), f"{target}: a distroless stage has no shell to RUN in"


def test_header_says_what_this_machine_does_not_exercise():
    header = DOCKERFILE.split("\nARG ", 1)[0]
    assert "scripts/images.sh" in header
    assert "unexercised" in header and "builder stages" in header and "distroless base" in header


def built_by_images_sh() -> set[str]:
    """NAME:TAG of every image scripts/images.sh builds: ours at `dev`, Consul at the version
    scripts/consul.sh pins (also tagged hashicorp/consul)."""
    script = (REPO / "scripts" / "images.sh").read_text()
    names = re.search(r"^all=\((.*)\)$", script, re.M).group(1).split()
    consul = re.search(r'CONSUL_VERSION="\$\{CONSUL_VERSION:-([0-9.]+)\}"', (REPO / "scripts" / "consul.sh").read_text()).group(1)
    assert "consul" in names and 'docker.io/hashicorp/consul:$tag' in script
    return {f"{n}:dev" for n in names if n != "consul"} | {f"consul:{consul}", f"hashicorp/consul:{consul}"}


def test_the_demo_workloads_use_images_that_images_sh_builds(helm, kustomize):
    """What the demo values, the example overlay and the Consul dev server run without a registry
    (imagePullPolicy Never, or Consul's pinned tag) is what scripts/images.sh puts in its archives."""
    built = built_by_images_sh()
    docs = helm.template(files=[CHART / "ci" / "demo-values.yaml"])
    docs += kustomize(DEPLOY / "overlays" / "example") + kustomize(DEPLOY / "consul-dev")
    local = set()
    for doc in docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            if container.get("imagePullPolicy") == "Never" or container["image"].startswith("hashicorp/consul:"):
                local.add(container["image"])
    assert {"consul-registrar:dev", "consul-registrar-demo-app:dev"} <= local, local
    assert local <= built, f"used but not built by scripts/images.sh: {local - built}"


def test_dockerignore_lets_through_what_is_copied():
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for sources in re.findall(r"^COPY\s+(?!--from)(.*)\s+\S+$", DOCKERFILE, re.M):
        for source in sources.split():
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"
    # ... and nothing else: what no COPY takes only invalidates the build cache.
    everything = {source for stage in stages() for source in copied(stage)}
    assert allowed <= everything, f".dockerignore lets through what is never copied: {allowed - everything}"
