#!/usr/bin/env bash
# The kind provider's images, made here with nothing pulled (tests/e2e/kind/cluster.sh calls it):
#
#   node-image.sh base        kind's base image as a root filesystem tarball (no Docker engine needed):
#                             `debootstrap --variant=minbase trixie`, then in a chroot the packages of
#                             kind's images/base/Dockerfile (less nfs-common and open-iscsi) plus
#                             Debian's containerd, runc and CNI plugins, kind's images/base/files
#                             from its Go module, and the Dockerfile's steps repeated.
#   node-image.sh components   the control-plane images kubeadm runs (kube-apiserver,
#                             kube-controller-manager, kube-scheduler, etcd, CoreDNS: static binaries
#                             of scripts/kubernetes.sh on an empty base; kube-proxy on the base root
#                             filesystem, which has nft/iptables and conntrack; pause from
#                             tests/e2e/cluster/pause.c), as docker-archives, with buildah.
#   node-image.sh node        (needs the Docker engine cluster.sh starts, DOCKER_HOST set) the node
#                             image: the base imported, kubeadm/kubelet/kubectl and /kind/version
#                             added, the component images imported into its containerd, committed
#                             and saved as a docker-archive. Prints the image's name.
#
# Everything is cached under ${CONSUL_REGISTRAR_CACHE:-~/.cache/consul-registrar}/kind/<key>/,
# key = kind, Kubernetes and Debian versions and REVISION below; each step is skipped when
# its output is there. Needs root (debootstrap, chroot), debootstrap, buildah, gcc, Go (for kind,
# kubeadm and the Kubernetes binaries).
set -euo pipefail
cd "$(dirname "$0")/../../.."

KIND_VERSION=v0.33.0
SUITE=trixie
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
# kind's base package list (images/base/Dockerfile) without nfs-common and open-iscsi, plus Debian's
# container runtime and CNI plugins instead of kind's builds of them.
PACKAGES=(systemd conntrack iptables nftables iproute2 ethtool util-linux mount kmod libseccomp2 pigz
  fuse-overlayfs e2fsprogs bash ca-certificates curl jq procps containerd runc containernetworking-plugins)

cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
kube_version=$(sed -n 's/^KUBERNETES_VERSION="\(.*\)"/\1/p' scripts/kubernetes.sh)
# Bump when what this script makes changes (the cache key).
REVISION=1
dir="$cache_root/kind/$KIND_VERSION-$kube_version-$SUITE-r$REVISION"
export GOMODCACHE="$cache_root/go/mod" GOCACHE="$cache_root/go/build" GOTOOLCHAIN=local CGO_ENABLED=0
kind_src="$GOMODCACHE/sigs.k8s.io/kind@$KIND_VERSION"
NODE_IMAGE="localhost/consul-registrar-kind-node:$kube_version-r$REVISION"

log() { printf 'node-image: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

mkdir -p "$dir"

# kind itself, from its Go module (its sources also give the base image's files).
kind_bin() {
  local bin="$dir/bin/kind"
  if [ ! -x "$bin" ]; then
    command -v go >/dev/null 2>&1 || die "no Go toolchain on PATH (kind $KIND_VERSION is built from its module)"
    log "building kind $KIND_VERSION from its Go module (about a minute)"
    GOBIN="$dir/bin" nice -n 19 go install -trimpath -ldflags '-s -w' "sigs.k8s.io/kind@$KIND_VERSION" >&2 ||
      die "go install sigs.k8s.io/kind@$KIND_VERSION failed"
  fi
  printf '%s\n' "$bin"
}

base() {
  local out="$dir/base-rootfs.tar" root
  if [ -f "$out" ]; then
    printf '%s\n' "$out"
    return
  fi
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found (apt-get install debootstrap)"
  kind_bin >/dev/null
  root=$(mktemp -d "$dir/rootfs.XXXXXX")
  # shellcheck disable=SC2064 # expanded now: the paths are fixed
  trap "umount -l '$root/proc' 2>/dev/null || true; rm -rf '$root'" EXIT
  log "debootstrap --variant=minbase $SUITE (about 30 s)"
  nice -n 19 debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$dir/debootstrap.log" 2>&1 ||
    die "debootstrap failed (see $dir/debootstrap.log)"
  # kind's base files, with the Dockerfile's modes (scripts 0755, the rest 0644).
  local f="$kind_src/images/base/files"
  install -m 0755 "$f"/usr/local/bin/* "$root/usr/local/bin/"
  mkdir -p "$root/kind/bin" "$root/LICENSES" "$root/etc/containerd" "$root/etc/default" \
    "$root/etc/sysctl.d" "$root/etc/systemd/system/kubelet.service.d" "$root/etc/kubernetes/manifests"
  install -m 0644 "$f"/kind/README.txt "$root/kind/"
  install -m 0755 "$f"/kind/bin/* "$root/kind/bin/"
  install -m 0644 "$f"/LICENSES/* "$root/LICENSES/"
  install -m 0644 "$f"/etc/crictl.yaml "$root/etc/"
  install -m 0644 "$f"/etc/default/* "$root/etc/default/"
  install -m 0644 "$f"/etc/sysctl.d/* "$root/etc/sysctl.d/"
  install -m 0644 "$f"/etc/systemd/system/*.service "$f"/etc/systemd/system/*.slice "$root/etc/systemd/system/"
  install -m 0644 "$f"/etc/systemd/system/kubelet.service.d/* "$root/etc/systemd/system/kubelet.service.d/"
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 0755 "$root/usr/sbin/policy-rc.d"
  mount -t proc proc "$root/proc"
  log "installing kind's base packages and Debian's containerd, runc, CNI plugins in a chroot (about 30 s)"
  # shellcheck disable=SC2016 # expanded in the chroot
  nice -n 19 chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive /bin/sh -euc '
    clean-install "$@"
    find /lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete
    rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \
      /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \
      /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/*
    echo ReadKMsg=no >>/etc/systemd/journald.conf
    ln -sf /usr/lib/systemd/systemd /sbin/init
    # kind runs its own builds from /usr/local: Debian ones linked where its units look.
    ln -sf /usr/bin/containerd /usr/local/bin/containerd
    ln -sf /usr/bin/ctr /usr/local/bin/ctr
    ln -sf /usr/bin/containerd-shim-runc-v2 /usr/local/bin/containerd-shim-runc-v2
    mkdir -p /opt/cni/bin
    for p in host-local loopback ptp portmap; do ln -sf /usr/lib/cni/$p /opt/cni/bin/$p; done
    ctr oci spec | jq ".hooks.createContainer[.hooks.createContainer|length] |= . + {\"path\": \"/kind/bin/mount-product-files.sh\"}" \
      | jq "del(.process.rlimits)" >/etc/containerd/cri-base.json
    systemctl enable kubelet.service containerd.service undo-mount-hacks.service
    systemctl mask systemd-binfmt.service
    rm -f /usr/sbin/policy-rc.d
  ' sh "${PACKAGES[@]}" >"$dir/chroot.log" 2>&1 || die "the chroot's package installation failed (see $dir/chroot.log)"
  umount "$root/proc"
  # kind's containerd configuration, after the package's (dpkg would ask which to keep). This
  # machine's bounding set lacks CAP_SYS_RESOURCE: the node's containerd may not lower
  # oom_score_adj below its own (the same setting rootless kind uses).
  install -m 0644 "$f"/etc/containerd/config.toml "$root/etc/containerd/config.toml"
  sed -i 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' "$root/etc/containerd/config.toml"
  sed -i "s#sandbox_image = .*#sandbox_image = \"$PAUSE_IMAGE\"#" "$root/etc/containerd/config.toml"
  [ -x "$root/usr/lib/cni/ptp" ] || die "no ptp CNI plugin in the base (containernetworking-plugins)"
  tar -C "$root" --numeric-owner -cf "$out.tmp" . || die "tar of the base root filesystem failed"
  mv -f "$out.tmp" "$out"
  rm -rf "$root"
  trap - EXIT
  log "base root filesystem: $out ($(du -h "$out" | cut -f1))"
  printf '%s\n' "$out"
}

buildah_() {
  nice -n 19 buildah --root "$dir/buildah/root" --runroot "$dir/buildah/runroot" --storage-driver vfs "$@"
}

# image NAME ARCHIVE FROM FILE:DEST... -- CONFIG...: a docker-archive of FROM (scratch or a rootfs
# tarball) plus the files, with buildah.
image() {
  local name=$1 archive=$2 from=$3 c spec
  shift 3
  [ ! -f "$archive" ] || return 0
  c=$(buildah_ from scratch)
  if [ "$from" != scratch ]; then
    buildah_ add "$c" "$from" / >/dev/null
  fi
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    spec=$1
    shift
    buildah_ copy --chmod 0755 "$c" "${spec%%:*}" "${spec#*:}" >/dev/null
  done
  [ $# -eq 0 ] || shift
  buildah_ config "$@" "$c"
  buildah_ commit --quiet --rm --format docker "$c" "$name" >/dev/null
  rm -f "$archive.tmp"
  buildah_ push --quiet "$name" "docker-archive:$archive.tmp:$name" >&2
  buildah_ rmi "$name" >/dev/null
  mv -f "$archive.tmp" "$archive"
  log "$name -> $archive ($(du -h "$archive" | cut -f1))"
}

components() {
  local bin images="$dir/images" tmp base_tar names n
  command -v buildah >/dev/null 2>&1 || die "buildah not found (apt-get install buildah)"
  bin=$(bash scripts/kubernetes.sh) || die "scripts/kubernetes.sh failed"
  base_tar=$(base)
  mkdir -p "$images"
  # The names kubeadm expects for this Kubernetes version.
  mapfile -t names < <("$bin/kubeadm" config images list --kubernetes-version "$kube_version" 2>/dev/null)
  [ "${#names[@]}" -ge 6 ] || die "kubeadm config images list gave ${names[*]}"
  for n in "${names[@]}"; do
    case "$n" in
    */kube-proxy:*)
      image "$n" "$images/kube-proxy.tar" "$base_tar" "$bin/kube-proxy:/usr/local/bin/kube-proxy" -- \
        --entrypoint '["/usr/local/bin/kube-proxy"]' --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
      ;;
    */kube-*:*)
      local b=${n##*/}
      b=${b%%:*}
      image "$n" "$images/$b.tar" scratch "$bin/$b:/usr/local/bin/$b" -- \
        --entrypoint "[\"/usr/local/bin/$b\"]" --env PATH=/usr/local/bin
      ;;
    */etcd:*)
      image "$n" "$images/etcd.tar" scratch "$bin/etcd:/usr/local/bin/etcd" "$bin/etcdctl:/usr/local/bin/etcdctl" -- \
        --entrypoint '["/usr/local/bin/etcd"]' --env PATH=/usr/local/bin
      ;;
    */coredns:*)
      image "$n" "$images/coredns.tar" scratch "$bin/coredns:/coredns" -- --entrypoint '["/coredns"]'
      ;;
    */pause:*)
      if [ ! -f "$images/pause.tar" ]; then
        tmp=$(mktemp -d)
        gcc -static -O2 -o "$tmp/pause" tests/e2e/cluster/pause.c || die "gcc -static pause.c failed"
        image "$n" "$images/pause.tar" scratch "$tmp/pause:/pause" -- --entrypoint '["/pause"]' --user 65535:65535
        rm -rf "$tmp"
      fi
      ;;
    *) die "kubeadm wants an image this script does not build: $n" ;;
    esac
  done
  printf '%s\n' "${names[@]}" >"$images/names"
  ls "$images"/*.tar
}

# The node image as a docker-archive, made without a Docker engine: the base root filesystem in a
# buildah container, kubeadm/kubelet/kubectl and /kind/version added, the component images imported
# into its own containerd (the node's containerd binary, run in a chroot of the image inside a mount,
# network and PID namespace of its own, so nothing of the host's network or mounts is touched),
# configured as kind's base image is, committed and saved. Prints the archive's path.
node_archive() {
  local out="$dir/node.tar" base_tar bin c m n t0=$SECONDS
  if [ -f "$out" ]; then
    printf '%s\n' "$out"
    return
  fi
  components >/dev/null
  base_tar=$(base)
  bin=$(bash scripts/kubernetes.sh) || die "scripts/kubernetes.sh failed"
  log "building the node image $NODE_IMAGE (a few minutes)"
  buildah_ rm --all >/dev/null 2>&1 || true
  c=$(buildah_ from scratch)
  m=$(buildah_ mount "$c")
  # shellcheck disable=SC2064 # expanded now: the names are fixed
  trap "buildah_ umount '$c' >/dev/null 2>&1 || true; buildah_ rm '$c' >/dev/null 2>&1 || true" EXIT
  nice -n 19 tar -C "$m" --numeric-owner -xf "$base_tar" || die "unpacking the base root filesystem failed"
  for n in kubeadm kubelet kubectl; do install -m 0755 "$bin/$n" "$m/usr/bin/$n"; done
  printf '%s\n' "$kube_version" >"$m/kind/version"
  mkdir -p "$m/kind-build/images"
  cp "$dir"/images/*.tar "$m/kind-build/images/"
  cat >"$m/kind-build/containerd.toml" <<'TOML'
version = 2
root = "/var/lib/containerd"
state = "/kind-build/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "/kind-build/containerd.sock"
TOML
  # The import as kind's own node-image build does it (pinned, all platforms, not unpacked: the
  # node's snapshotter unpacks on first use).
  # shellcheck disable=SC2016 # expanded in the namespaces
  nice -n 19 unshare --mount --net --pid --fork --propagation private /bin/sh -euc '
    m=$1
    mount -t proc proc "$m/proc"
    chroot "$m" containerd --config /kind-build/containerd.toml >"$m/kind-build/containerd.log" 2>&1 &
    pid=$!
    ctr_() { chroot "$m" ctr --address /kind-build/containerd.sock "$@"; }
    i=0
    until ctr_ version >/dev/null 2>&1; do
      i=$((i + 1))
      [ "$i" -lt 60 ] || { echo "containerd did not start" >&2; tail -20 "$m/kind-build/containerd.log" >&2; exit 1; }
      sleep 0.5
    done
    for f in "$m"/kind-build/images/*.tar; do
      echo "node-image: importing $(basename "$f") into the node'"'"'s containerd" >&2
      ctr_ -n k8s.io images import --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests \
        "/kind-build/images/$(basename "$f")" >&2
    done
    ctr_ -n k8s.io images ls -q >&2
    kill "$pid"
    wait "$pid" || true
    umount "$m/proc"
  ' sh "$m" || die "importing the component images into the node's containerd failed"
  rm -rf "$m/kind-build"
  buildah_ umount "$c" >/dev/null
  # kind's base image configuration (images/base/Dockerfile) and its node build's entrypoint.
  buildah_ config --env container=docker --stop-signal SIGRTMIN+3 \
    --entrypoint '["/usr/local/bin/entrypoint", "/sbin/init"]' "$c"
  buildah_ commit --quiet --rm --format docker "$c" "$NODE_IMAGE" >/dev/null || die "buildah commit of the node image failed"
  trap - EXIT
  rm -f "$out.tmp"
  buildah_ push --quiet "$NODE_IMAGE" "docker-archive:$out.tmp:$NODE_IMAGE" >&2 || die "saving the node image failed"
  buildah_ rmi "$NODE_IMAGE" >/dev/null
  mv -f "$out.tmp" "$out"
  log "node image $NODE_IMAGE made in $((SECONDS - t0)) s: $out ($(du -h "$out" | cut -f1))"
  printf '%s\n' "$out"
}

# The node image loaded into the engine DOCKER_HOST names (cluster.sh up); prints its name.
node() {
  local archive
  docker info >/dev/null 2>&1 || die "no Docker engine answers (cluster.sh up starts one)"
  archive=$(node_archive)
  if ! docker image inspect "$NODE_IMAGE" >/dev/null 2>&1; then
    log "loading the node image from $archive"
    docker load -i "$archive" >&2 || die "docker load -i $archive failed"
  fi
  printf '%s\n' "$NODE_IMAGE"
}

case "${1:-}" in
base) base ;;
kind) kind_bin ;;
components) components ;;
node-archive) node_archive ;;
node) node ;;
dir) printf '%s\n' "$dir" ;;
*)
  echo "usage: $0 base|kind|components|node-archive|node|dir" >&2
  exit 2
  ;;
esac
