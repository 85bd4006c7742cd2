#!/usr/bin/env bash
# Builds the project's container images without a Docker engine or a registry, with buildah, and
# writes one docker-archive tarball per image (importable by `ctr -n k8s.io images import` and by
# `kind load image-archive`):
#
#   bash scripts/images.sh [NAME[:TAG]...]     # default: every image below
#
#   consul-registrar:dev               the sidecar       } the Dockerfile's runtime stages, built by
#   consul-registrar-demo-app:dev      the demo gRPC app } `buildah bud` over prebuilt binaries
#   consul-registrar-hello-server:dev  the tutorial's Go server (tests/interop/go)
#   consul-registrar-hello-client:dev  its Consul-resolving client
#   consul:<version>                   Consul from scripts/consul.sh (also tagged hashicorp/consul,
#                                      the name deploy/consul-dev uses), user consul 100:1000
#
# Each archive names its image fully qualified (docker.io/library/NAME:TAG), as containerd and the
# kubelet resolve `NAME:TAG`, so a pod spec with `image: NAME:TAG` and `imagePullPolicy: Never`
# finds it. stdout: the archive paths, one per line, in the order asked; everything else (progress,
# buildah's output) goes to stderr.
#
# How: the sidecar and the demo app come from `cargo build --release --locked` on this host, each
# package on its own (`-p consul-registrar --bin consul-registrar`, `-p demo-app --bin demo-app`;
# CARGO_TARGET_DIR, default the shared cache), and go through the Dockerfile's own runtime stages
# (`--build-arg BINARIES=prebuilt`) over a distroless-like base assembled here from the host's
# Debian 12 glibc and libgcc, CA bundle and passwd (`localhost/consul-registrar-base:cc`); the Go
# peers (static, from scripts/go-peers.sh) and Consul (static, from scripts/consul.sh) go onto the
# same base without the libraries (`…:static`). What the Dockerfile's rust builder stages and the
# real distroless base do is not exercised here (see the Dockerfile's header). Every image is run
# once in its own root filesystem (`buildah run`, as the image's user) before it is exported.
#
# Needs buildah and skopeo (installed from Debian when missing and run as root with apt-get; else
# apt-get install buildah skopeo), dpkg (the libraries' list),
# cargo, and Go for the peers and Consul (the first builds take minutes; cached after that).
# Storage: ${cache}/buildah (vfs driver), archives: ${cache}/images, where cache is
# ${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-~/.cache}/consul-registrar}. Runs serialise on a lock.
set -euo pipefail
cd "$(dirname "$0")/.."

# What cargo builds for each image: the same package and binary as the Dockerfile's compiled-*
# stages (the sidecar without the demo app's package, hence without its protoc build script).
REGISTRAR_CARGO=(-p consul-registrar --bin consul-registrar)
DEMO_APP_CARGO=(-p demo-app --bin demo-app)

cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
images_dir="$cache_root/images"
buildah_dir="$cache_root/buildah"
target_dir="${CARGO_TARGET_DIR:-$cache_root/target}"
BASE_STATIC=localhost/consul-registrar-base:static
BASE_CC=localhost/consul-registrar-base:cc
NONROOT=65532:65532
SOURCE=https://github.com/consul-registrar/consul-registrar

log() { printf 'images.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

usage() {
  cat >&2 <<'USAGE'
usage: scripts/images.sh [NAME[:TAG]...]
  NAME: consul-registrar, consul-registrar-demo-app, consul-registrar-hello-server,
        consul-registrar-hello-client, consul (default: all of them)
Prints the path of each image's docker-archive, one per line.
USAGE
}

# ---- what to build --------------------------------------------------------------------------------

all=(consul-registrar consul-registrar-demo-app consul-registrar-hello-server consul-registrar-hello-client consul)
wanted=()
for arg in "$@"; do
  case "$arg" in
  -h | --help)
    usage
    exit 0
    ;;
  esac
  name=${arg%%:*}
  found=0
  for known in "${all[@]}"; do [ "$name" = "$known" ] && found=1; done
  if [ "$found" -eq 0 ]; then
    usage
    die "unknown image '$arg'"
  fi
  wanted+=("$arg")
done
[ "${#wanted[@]}" -gt 0 ] || wanted=("${all[@]}")
for w in "${wanted[@]}"; do # ours are always :dev; Consul's tag is checked once its version is known
  case "$w" in
  consul:* | *:dev | "${w%%:*}") ;;
  *) die "$w: this checkout builds ${w%%:*}:dev" ;;
  esac
done

wants() { # <name>: asked for?
  local w
  for w in "${wanted[@]}"; do [ "${w%%:*}" = "$1" ] && return 0; done
  return 1
}

missing=()
for tool in buildah skopeo; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
# A fresh Debian/Ubuntu machine lacks them: installed from Debian when we are root with apt-get.
if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "installing from Debian: ${missing[*]} (once)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >&2 ||
    die "apt-get install ${missing[*]} failed"
  missing=()
fi
command -v dpkg >/dev/null 2>&1 || missing+=(dpkg)
[ "${#missing[@]}" -eq 0 ] ||
  die "${missing[*]} not found: install them (Debian/Ubuntu: apt-get install buildah skopeo), or run this as root where apt-get can"

# ---- buildah's own storage, outside the system's --------------------------------------------------

mkdir -p "$images_dir" "$buildah_dir"
exec 9>"$images_dir/.lock"
if ! flock -n 9; then
  log "another images.sh is running; waiting for it"
  flock 9
fi

cat >"$buildah_dir/storage.conf" <<EOF
# Written by scripts/images.sh: buildah's and skopeo's storage for the project's images.
[storage]
driver = "vfs"
graphroot = "$buildah_dir/storage"
runroot = "$buildah_dir/run"
EOF
export CONTAINERS_STORAGE_CONF="$buildah_dir/storage.conf"
export BUILDAH_ISOLATION=chroot BUILDAH_FORMAT=docker

work=$(mktemp -d "${TMPDIR:-/tmp}/images.XXXXXX")
container=""
# The storage is this script's alone and the lock is held: every working container can go,
# including those `buildah bud` leaves behind for the Dockerfile's binary-only stages.
remove_containers() { buildah rm --all >/dev/null 2>&1 || true; }
trap 'remove_containers; rm -rf "$work"' EXIT

new_container() { # <image>: sets $container to a new working container of <image>, removed at exit
  container=$(buildah from --pull=never --quiet "$1")
}

# Layer and creation times: the last commit's, so an unchanged input gives the same layers (the
# config, hence the image ID, still differs between runs).
epoch=$(git log -1 --format=%ct 2>/dev/null || echo 0)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
version=$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)
[ -n "$version" ] || die "no version in Cargo.toml"

commit() { # <container> <image name>
  buildah commit --quiet --format docker --timestamp "$epoch" "$1" "$2" >/dev/null
}

is_static() {
  local out
  out=$(LC_ALL=C ldd "$1" 2>&1 || true)
  grep -qE 'not a dynamic executable|statically linked' <<<"$out"
}

# ---- the binaries ---------------------------------------------------------------------------------

registrar_bin="$target_dir/release/consul-registrar"
demo_app_bin="$target_dir/release/demo-app"

cargo_build() { # <cargo selection...>
  command -v cargo >/dev/null 2>&1 || die "cargo not found (https://rustup.rs)"
  log "cargo build --release --locked $* (CARGO_TARGET_DIR=$target_dir; minutes when cold)"
  CARGO_TARGET_DIR="$target_dir" cargo build --release --locked "$@" >&2 ||
    die "cargo build --release --locked $* failed"
}

# Each binary is copied out as soon as it is built: other checkouts sharing the target directory
# overwrite target/release.
mkdir -p "$work/prebuilt-registrar" "$work/prebuilt-demo"
if wants consul-registrar; then
  cargo_build "${REGISTRAR_CARGO[@]}"
  cp "$registrar_bin" "$work/prebuilt-registrar/consul-registrar"
  got=$("$work/prebuilt-registrar/consul-registrar" --version) || die "$registrar_bin --version failed"
  [ "$got" = "consul-registrar $version" ] || die "$registrar_bin says '$got', Cargo.toml says $version"
fi
if wants consul-registrar-demo-app; then
  cargo_build "${DEMO_APP_CARGO[@]}"
  cp "$demo_app_bin" "$work/prebuilt-demo/demo-app"
fi

if wants consul-registrar-hello-server || wants consul-registrar-hello-client; then
  log "providing the Go peers (scripts/go-peers.sh)"
  peers=$(bash scripts/go-peers.sh) || die "scripts/go-peers.sh failed"
  for b in hello-server hello-client; do
    is_static "$peers/$b" || die "$peers/$b is dynamically linked; the image has no libraries (build it with CGO_ENABLED=0)"
  done
fi

if wants consul; then
  log "providing Consul (scripts/consul.sh; a first build takes minutes)"
  consul_bin=$(bash scripts/consul.sh) || die "scripts/consul.sh failed"
  consul_version=$("$consul_bin" version | sed -n 's/^Consul v\([0-9][0-9.]*\).*/\1/p')
  [ -n "$consul_version" ] || die "$consul_bin version: no version"
  is_static "$consul_bin" || die "$consul_bin is dynamically linked; the image has no libraries (CGO_ENABLED=0)"
fi

tag_of() { # <name>: the tag this run builds
  case "$1" in
  consul) printf '%s\n' "$consul_version" ;;
  *) printf 'dev\n' ;;
  esac
}
for w in "${wanted[@]}"; do
  [ "$w" = "${w%%:*}" ] || [ "${w#*:}" = "$(tag_of "${w%%:*}")" ] ||
    die "$w: this checkout builds ${w%%:*}:$(tag_of "${w%%:*}")"
done

# ---- the bases: distroless-like, from the host's Debian files -------------------------------------

# static: CA bundle, passwd/group with root, nobody and nonroot (65532), nsswitch.conf, /tmp,
# nonroot's home; user 65532, like gcr.io/distroless/static-debian12:nonroot.
build_base_static() {
  local c root
  log "base $BASE_STATIC: CA bundle, passwd (nonroot 65532), /tmp"
  [ -f /etc/ssl/certs/ca-certificates.crt ] || die "no /etc/ssl/certs/ca-certificates.crt (apt-get install ca-certificates)"
  new_container scratch
  c=$container
  root=$(buildah mount "$c")
  mkdir -p "$root"/{etc/ssl/certs,usr/local/bin,bin,tmp,root,home/nonroot}
  install -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  local f
  for f in /etc/services /etc/protocols; do [ ! -f "$f" ] || install -m 0644 "$f" "$root$f"; done
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root" "$root/home/nonroot"
  chown 65532:65532 "$root/home/nonroot"
  buildah umount "$c" >/dev/null
  buildah config --user "$NONROOT" --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --label org.opencontainers.image.description="Local distroless-like base made by scripts/images.sh (static)" "$c"
  commit "$c" "$BASE_STATIC"
}

# cc: static plus the shared libraries of Debian's libc6 and libgcc-s1 (as distroless/cc, without
# libstdc++, libgomp and OpenSSL, which nothing here links), at the paths the packages give them.
build_base_cc() {
  local c root p n=0
  log "base $BASE_CC: + glibc and libgcc from the host's libc6 and libgcc-s1 ($(dpkg-query -W -f='${Version}' libc6))"
  new_container "$BASE_STATIC"
  c=$container
  root=$(buildah mount "$c")
  while IFS= read -r p; do
    if [ -L "$p" ]; then
      mkdir -p "$root$(dirname "$p")"
      ln -sfn "$(readlink "$p")" "$root$p"
    elif [ -f "$p" ]; then
      install -D -m 0755 "$p" "$root$p"
    else
      continue
    fi
    n=$((n + 1))
  done < <(dpkg -L libc6 libgcc-s1 | grep -E '\.so(\.[0-9]+)*$' | grep -vE '/(gconv|audit)/')
  [ "$n" -gt 0 ] || die "dpkg -L libc6 libgcc-s1 listed no libraries"
  buildah umount "$c" >/dev/null
  buildah config --label org.opencontainers.image.description="Local distroless-like base made by scripts/images.sh (glibc, libgcc)" "$c"
  commit "$c" "$BASE_CC"
}

# ---- the images -----------------------------------------------------------------------------------

# The Dockerfile's runtime stage <target> over BASE_CC, with the binaries in <dir> for its prebuilt stages.
build_dockerfile_target() { # <target> <image> <prebuilt dir>
  log "$2: buildah bud --target $1 (the Dockerfile's runtime stage, prebuilt binaries, base $BASE_CC)"
  buildah bud --pull=never --layers=false --quiet --format docker --isolation chroot --timestamp "$epoch" \
    --target "$1" --build-arg BINARIES=prebuilt --build-arg DISTROLESS_IMAGE="$BASE_CC" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    --build-context prebuilt="$3" -f Dockerfile -t "$2" . >&2
}

build_registrar() {
  build_dockerfile_target consul-registrar "$1" "$work/prebuilt-registrar"
}

build_demo_app() {
  build_dockerfile_target demo-app "$1" "$work/prebuilt-demo"
}

labels() { # <title> <description>: buildah config arguments for the OCI labels
  printf '%s\n' --label "org.opencontainers.image.title=$1" --label "org.opencontainers.image.description=$2" \
    --label "org.opencontainers.image.source=$SOURCE" --label "org.opencontainers.image.revision=$revision"
}

build_go_peer() { # <image> <binary> <description> [cmd json]
  local c args
  log "$1: $2 (static) on $BASE_STATIC"
  new_container "$BASE_STATIC"
  c=$container
  buildah copy --quiet --chmod 0755 "$c" "$peers/$2" "/usr/local/bin/$2" >/dev/null
  mapfile -t args < <(labels "$2" "$3")
  [ -z "${4:-}" ] || args+=(--cmd "$4")
  buildah config --user "$NONROOT" --entrypoint "[\"/usr/local/bin/$2\"]" "${args[@]}" "$c"
  commit "$c" "$1"
}

build_consul() { # <image>
  local c root args
  log "$1: Consul $consul_version (static) on $BASE_STATIC, user consul 100:1000"
  new_container "$BASE_STATIC"
  c=$container
  root=$(buildah mount "$c")
  # The official image's user and layout: consul 100:1000, /consul/{data,config}, /bin/consul.
  printf 'consul:x:100:1000:consul:/consul:/sbin/nologin\n' >>"$root/etc/passwd"
  printf 'consul:x:1000:\n' >>"$root/etc/group"
  mkdir -p "$root/consul/data" "$root/consul/config"
  chown -R 100:1000 "$root/consul"
  install -m 0755 "$consul_bin" "$root/bin/consul"
  buildah umount "$c" >/dev/null
  mapfile -t args < <(labels consul "Consul $consul_version, built from its Go module by scripts/consul.sh")
  buildah config --user 100:1000 --workingdir /consul --entrypoint '["/bin/consul"]' \
    --cmd '["agent","-dev","-client","0.0.0.0"]' \
    --port 8500/tcp --port 8600/tcp --port 8600/udp --port 8300/tcp --port 8301/tcp --port 8301/udp --port 8302/tcp \
    --port 8502/tcp --port 8503/tcp \
    --label org.opencontainers.image.version="$consul_version" "${args[@]}" "$c"
  commit "$c" "$1"
}

# Runs <command...> in <image>'s root filesystem as the image's user; its output goes to the log.
smoke() { # <image> <command...>
  local image=$1 c out
  shift
  new_container "$image"
  c=$container
  if ! out=$(buildah run --isolation chroot "$c" -- "$@" 2>&1); then
    printf '%s\n' "$out" >&2
    die "$image: \`$*\` failed in the image's root filesystem"
  fi
  log "$image: \`$*\` ran as $(buildah inspect --type image --format '{{.Docker.Config.User}}' "$image"): $(printf '%s\n' "$out" | head -n 1)"
}

export_archive() { # <name> <tag> [additional fully qualified tag...]: prints the archive's path
  local name=$1 tag=$2 ref archive extra=()
  shift 2
  ref="docker.io/library/$name:$tag"
  archive="$images_dir/${name}_$tag.tar"
  local t
  for t in "$@"; do extra+=(--additional-tag "$t"); done
  rm -f "$archive.tmp"
  skopeo copy --quiet "${extra[@]}" "containers-storage:$ref" "docker-archive:$archive.tmp:$ref" >&2
  mv -f "$archive.tmp" "$archive"
  log "$ref -> $archive ($(du -h "$archive" | cut -f1))"
  printf '%s\n' "$archive"
}

build_base_static
if wants consul-registrar || wants consul-registrar-demo-app; then
  build_base_cc
fi

archives=()
for w in "${wanted[@]}"; do
  name=${w%%:*}
  tag=$(tag_of "$name")
  ref="docker.io/library/$name:$tag"
  case "$name" in
  consul-registrar)
    build_registrar "$ref"
    smoke "$ref" /usr/local/bin/consul-registrar --version
    archives+=("$(export_archive "$name" "$tag")")
    ;;
  consul-registrar-demo-app)
    build_demo_app "$ref"
    smoke "$ref" /usr/local/bin/demo-app --help
    archives+=("$(export_archive "$name" "$tag")")
    ;;
  consul-registrar-hello-server)
    build_go_peer "$ref" hello-server "The tutorial's helloworld.Greeter gRPC server with a controllable health service" \
      '["-listen","0.0.0.0:50051"]'
    smoke "$ref" /usr/local/bin/hello-server -h
    archives+=("$(export_archive "$name" "$tag")")
    ;;
  consul-registrar-hello-client)
    build_go_peer "$ref" hello-client "The tutorial's gRPC client resolving its servers through Consul (round_robin)"
    smoke "$ref" /usr/local/bin/hello-client -h
    archives+=("$(export_archive "$name" "$tag")")
    ;;
  consul)
    build_consul "$ref"
    smoke "$ref" consul version
    archives+=("$(export_archive "$name" "$tag" "docker.io/hashicorp/consul:$tag")")
    ;;
  esac
done

# Drop what this run superseded (untagged images, the build's intermediate stages).
remove_containers
buildah rmi --prune >/dev/null || log "warning: buildah rmi --prune failed (old images stay in $buildah_dir)"
printf '%s\n' "${archives[@]}"
