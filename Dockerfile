# consul-registrar's container images. Two targets share one builder:
#
#   docker build -t consul-registrar:dev .                             # the sidecar (default target)
#   docker build --target demo-app -t consul-registrar-demo-app:dev .  # the demo gRPC app
#
# The final stages hold one binary on distroless `cc` (glibc, libgcc, CA certificates; no shell,
# no package manager) and run as UID/GID 65532. The dependency layer is built from Cargo.toml and
# Cargo.lock alone, so a source change rebuilds only the crate itself.

ARG RUST_VERSION=1.95
ARG DISTROLESS_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---- builder: dependencies first, then the sources -----------------------------------------
# bookworm, like distroless/cc-debian12, so the binary links against the same glibc.
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src

# 1. Dependencies. Placeholder sources stand in for the crate so that this layer depends only on
#    the manifest, the lock file and the build script's inputs (protoc comes from the
#    protoc-bin-vendored build-dependency: no system package needed).
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir -p src examples \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > examples/demo_app.rs \
 && cargo build --release --locked --bin consul-registrar --example demo-app \
 && rm -rf src examples

# 2. The crate. Removing its fingerprints makes cargo rebuild it even where COPY kept older mtimes
#    than the placeholder build's.
COPY src ./src
COPY examples ./examples
RUN rm -rf target/release/.fingerprint/consul-registrar-* \
 && cargo build --release --locked --bin consul-registrar --example demo-app \
 && mkdir -p /out \
 && cp target/release/consul-registrar target/release/examples/demo-app /out/ \
 && /out/consul-registrar --version

# ---- the demo app (`--target demo-app`) ----------------------------------------------------
FROM ${DISTROLESS_IMAGE} AS demo-app
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="consul-registrar demo app" \
      org.opencontainers.image.description="The helloworld.Greeter gRPC server with a flippable gRPC health service, for consul-registrar demos and e2e tests" \
      org.opencontainers.image.source="https://github.com/consul-registrar/consul-registrar" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder /out/demo-app /usr/local/bin/demo-app
USER 65532:65532
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/demo-app"]
# gRPC on every interface; the control port (flip health) on loopback, for `kubectl exec`.
CMD ["serve", "--listen", "0.0.0.0:50051", "--control", "127.0.0.1:8080"]

# ---- the sidecar (default target) ------------------------------------------------------------
FROM ${DISTROLESS_IMAGE} AS consul-registrar
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="consul-registrar" \
      org.opencontainers.image.description="A sidecar that keeps an application's Consul registration in step with its gRPC health" \
      org.opencontainers.image.source="https://github.com/consul-registrar/consul-registrar" \
      org.opencontainers.image.documentation="https://github.com/consul-registrar/consul-registrar#readme" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder /out/consul-registrar /usr/local/bin/consul-registrar
USER 65532:65532
# The admin server: /metrics, /healthz, /readyz, /drain, /status.
EXPOSE 9102
ENTRYPOINT ["/usr/local/bin/consul-registrar"]
# `probe --addr HOST:PORT` turns the same image into a gRPC health probe (exec probes).
CMD ["run"]
