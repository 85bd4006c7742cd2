# consul-registrar's container images. One target per image, and each compiles only its own binary:
#
#   VERSION="$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)"
#   docker build --build-arg VERSION="$VERSION" -t consul-registrar:dev .                            # the sidecar (default target)
#   docker build --build-arg VERSION="$VERSION" --target demo-app -t consul-registrar-demo-app:dev . # the demo gRPC app
#
# VERSION is required and must be Cargo.toml's `version` (the builder checks it), so the image's
# version label always says what the binary's `--version` says. REVISION (optional): the git commit.
#
# Needs BuildKit (docker build's builder since Docker 23, and buildx): it builds only the stages
# the target reaches, so the stages BINARIES does not select are never looked at.
#
# The final stages hold one binary on distroless `cc` (glibc, libgcc, CA certificates; no shell,
# no package manager) and run as UID/GID 65532. Each binary's dependency layer is built from the
# workspace's manifests and Cargo.lock (and the demo app's build.rs and proto/) alone, so a source
# change rebuilds only the crate itself. The sidecar's builder builds the consul-registrar package
# only (`-p consul-registrar --bin consul-registrar`), the demo app's the demo-app workspace member
# (`-p demo-app --bin demo-app`).
#
# Multi-architecture: both base images are pinned by the digest of their multi-platform index, so
# one pin resolves every architecture:
#
#   docker buildx build --platform linux/amd64,linux/arm64 --build-arg VERSION="$VERSION" \
#     -t REGISTRY/consul-registrar:"$VERSION" --push .
#
# Each platform's builder compiles natively, so the platform that is not the host's runs under QEMU
# (install binfmt handlers first, e.g. `docker run --privileged --rm tonistiigi/binfmt --install
# arm64`; expect a release build several times slower), or give buildx one native node per
# platform (`docker buildx create --append`).
#
# Updating a base image: change tag and digest together. The digest is that of the tag's index
# (not of one platform's manifest); either command prints it:
#
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot   # the "Digest:" line
#   skopeo inspect --raw docker://gcr.io/distroless/cc-debian12:nonroot | sha256sum
#
# (the same for rust:1.95-slim-bookworm; keep the builder on bookworm, the runtime's glibc).
# The pins below were written without registry access (2026-11-25): each is the digest that many
# public Dockerfiles pin for its tag, not re-resolved from the registry here, and may be older
# than the tag's newest build. Re-resolve both with the commands above before a release.
#
# Without Docker, scripts/images.sh (`make images`) builds the two runtime stages with buildah:
# BINARIES=prebuilt takes the release binaries `cargo build --release --locked -p …` made on the host
# (build context `prebuilt`, a directory holding consul-registrar and demo-app), and
# DISTROLESS_IMAGE names a distroless-like base that script assembles from the host's Debian 12
# glibc, libgcc, CA bundle and a nonroot (65532) user. What that leaves unexercised: the rust
# builder stages (workspace, compiled-*) and the real distroless base, whose pull and digest are
# only checked where a registry is reachable (`docker build` as above, tests/e2e/kind).

ARG RUST_IMAGE=rust:1.95-slim-bookworm@sha256:d7482085ff5b415f84dba5647ae71606650bdef00db7aeb69f4b3d170c3e4082
ARG DISTROLESS_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
# Where the binaries come from: `compiled` (the builder stages below) or `prebuilt` (build context
# `prebuilt`, binaries built for bookworm's glibc and the target platform).
ARG BINARIES=compiled

# ---- builder: the workspace's manifests and placeholder sources, shared by both binaries ------
# bookworm, like distroless/cc-debian12, so the binaries link against the same glibc.
FROM ${RUST_IMAGE} AS workspace
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
ARG VERSION
RUN want="$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)" \
 && if [ "${VERSION}" != "$want" ]; then \
      echo "VERSION='${VERSION}' but Cargo.toml says $want: build with --build-arg VERSION=$want" >&2; exit 1; \
    fi
# cargo loads every workspace member (the sidecar ".", demo-app, testkit), so each one's manifest
# is here, with placeholders for the targets it declares: each dependency layer below then depends
# only on the manifests and the lock file (and, for the demo app, on its build.rs and proto/).
COPY demo-app/Cargo.toml ./demo-app/
COPY testkit/Cargo.toml ./testkit/
RUN mkdir -p src demo-app/src testkit/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > demo-app/src/main.rs \
 && touch demo-app/src/lib.rs testkit/src/lib.rs

# ---- the sidecar's binary: its dependencies, then the crate ----------------------------------
# Only the consul-registrar package: not the demo app (a dev-dependency), so no protoc build
# script. Removing the crate's fingerprints makes cargo rebuild it even where COPY kept older
# mtimes than the placeholder build's.
FROM workspace AS compiled-consul-registrar
RUN cargo build --release --locked -p consul-registrar --bin consul-registrar
COPY src ./src
RUN rm -rf target/release/.fingerprint/consul-registrar-* \
 && cargo build --release --locked -p consul-registrar --bin consul-registrar \
 && mkdir -p /out \
 && cp target/release/consul-registrar /out/ \
 && /out/consul-registrar --version

# ---- the demo app's binary: the demo-app package (protoc comes from its protoc-bin-vendored
# build-dependency: no system package needed) -------------------------------------------------
FROM workspace AS compiled-demo-app
COPY demo-app/build.rs ./demo-app/
COPY demo-app/proto ./demo-app/proto
RUN cargo build --release --locked -p demo-app --bin demo-app
COPY demo-app/src ./demo-app/src
RUN rm -rf target/release/.fingerprint/demo-app-* \
 && cargo build --release --locked -p demo-app --bin demo-app \
 && mkdir -p /out \
 && cp target/release/demo-app /out/ \
 && /out/demo-app --help >/dev/null

# ---- or binaries built elsewhere (--build-arg BINARIES=prebuilt --build-context prebuilt=DIR) --
# Nothing refers to these stages unless BINARIES=prebuilt, so a plain build never looks for DIR.
FROM scratch AS prebuilt-consul-registrar
# hadolint ignore=DL3022
COPY --from=prebuilt consul-registrar /out/consul-registrar

FROM scratch AS prebuilt-demo-app
# hadolint ignore=DL3022
COPY --from=prebuilt demo-app /out/demo-app

# ---- each binary, from where BINARIES says ---------------------------------------------------
FROM ${BINARIES}-consul-registrar AS consul-registrar-binary
FROM ${BINARIES}-demo-app AS demo-app-binary

# ---- the demo app (`--target demo-app`) ----------------------------------------------------
FROM ${DISTROLESS_IMAGE} AS demo-app
ARG VERSION
ARG REVISION=unknown
LABEL org.opencontainers.image.title="consul-registrar demo app" \
      org.opencontainers.image.description="The helloworld.Greeter gRPC server with a flippable gRPC health service, for consul-registrar demos and e2e tests" \
      org.opencontainers.image.source="https://github.com/consul-registrar/consul-registrar" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=demo-app-binary /out/demo-app /usr/local/bin/demo-app
USER 65532:65532
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/demo-app"]
# gRPC on every interface; the control port (flip health) on loopback, for `kubectl exec`.
CMD ["serve", "--listen", "0.0.0.0:50051", "--control", "127.0.0.1:8080"]

# ---- the sidecar (default target) ------------------------------------------------------------
FROM ${DISTROLESS_IMAGE} AS consul-registrar
ARG VERSION
ARG REVISION=unknown
LABEL org.opencontainers.image.title="consul-registrar" \
      org.opencontainers.image.description="A sidecar that keeps an application's Consul registration in step with its gRPC health" \
      org.opencontainers.image.source="https://github.com/consul-registrar/consul-registrar" \
      org.opencontainers.image.documentation="https://github.com/consul-registrar/consul-registrar#readme" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=consul-registrar-binary /out/consul-registrar /usr/local/bin/consul-registrar
USER 65532:65532
# The admin server: /metrics, /healthz, /readyz, /drain, /status.
EXPOSE 9102
ENTRYPOINT ["/usr/local/bin/consul-registrar"]
# `probe --addr HOST:PORT` turns the same image into a gRPC health probe (exec probes).
CMD ["run"]
