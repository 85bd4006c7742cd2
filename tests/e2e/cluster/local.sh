#!/usr/bin/env bash
# The local cluster provider of the e2e suite: a real single-node Kubernetes made of local processes
# (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy in iptables
# mode, a private containerd with the bridge CNI) plus CoreDNS running in the cluster. Everything it
# starts lives under one work directory and is removed again by `down`.
#
#   local.sh up                 provision (idempotent; cleans the leftovers of a crashed run first)
#   local.sh down               tear down completely (processes, containers, mounts, links, iptables)
#   local.sh env                print `export KUBECONFIG=… NODE_IP=…` for eval
#   local.sh load ARCHIVE...    import docker-archive/oci-archive tarballs into the node's containerd
#   local.sh status             what runs, and the node's state
#
# Needs root, Debian's apt for the packages it lacks, and Go for scripts/kubernetes.sh (the pinned
# binaries, built once and cached). See tests/e2e/cluster/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cache_root="${CONSUL_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/consul-registrar}"
WORK="${CONSUL_REGISTRAR_E2E_DIR:-/var/lib/consul-registrar-e2e}"

# The node's own address lives on a dummy interface this script creates; the CIDRs avoid the host's.
NODE_NAME="consul-registrar-e2e"
NODE_LINK="crnode0"
NODE_IP="10.217.0.1"
POD_CIDR="10.218.0.0/16"
NODE_POD_CIDR="10.218.0.0/24"
POD_GATEWAY="10.218.0.1"
BRIDGE="crbr0"
CNI_NETWORK="crnet"
SERVICE_CIDR="10.219.0.0/16"
API_SERVICE_IP="10.219.0.1"
DNS_IP="10.219.0.10"
API_PORT=6443
ETCD_CLIENT_PORT=12379
ETCD_PEER_PORT=12380
PAUSE_IMAGE="registry.k8s.io/pause:3.10"
COREDNS_VERSION="v1.14.7"
COREDNS_IMAGE="localhost/consul-registrar-e2e/coredns:$COREDNS_VERSION"

RUN="$WORK/run"
LOGS="$WORK/logs"
PKI="$WORK/pki"
CONF="$WORK/conf"
SOCK="$RUN/containerd.sock"
KUBECONFIG_ADMIN="$WORK/admin.kubeconfig"
# Kernel settings the node changes (forwarding; the kubelet's own tunables): saved at `up`,
# restored at `down`.
SYSCTLS=(net.ipv4.ip_forward vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
COMPONENTS=(kube-proxy kubelet containerd kube-scheduler kube-controller-manager kube-apiserver etcd)

log() { printf 'local.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# Any unexpected failure says where, so that a failed provisioning is never silent.
trap 'log "error: failed at line $LINENO: $BASH_COMMAND"' ERR

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it creates interfaces, mounts and iptables rules)"; }

kubectl_admin() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }
ctr_node() { ctr --address "$SOCK" -n k8s.io "$@"; }

# --- packages -------------------------------------------------------------------------------

ensure_packages() {
  local -A need=([containerd]=containerd [runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins
    [iptables]=iptables [conntrack]=conntrack [buildah]=buildah [openssl]=openssl [dig]=bind9-dnsutils
    [gcc]=gcc [ip]=iproute2 [flock]=util-linux)
  local missing=() tool
  for tool in "${!need[@]}"; do
    if [[ $tool == /* ]]; then [ -e "$tool" ] || missing+=("${need[$tool]}"); else
      command -v "$tool" >/dev/null 2>&1 || missing+=("${need[$tool]}")
    fi
  done
  # gcc -static needs the C library's static archive.
  [ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e /usr/lib/libc.a ] || missing+=(libc6-dev)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing packages (${missing[*]}) and no apt-get to install them"
  log "installing from Debian: ${missing[*]}"
  apt-get update -qq >&2 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
}

# --- processes ------------------------------------------------------------------------------

pid_of() { # prints the pid of a running component started by us, or fails
  local f="$RUN/$1.pid" pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$1" || return 1
  printf '%s\n' "$pid"
}

start() { # start NAME BINARY ARGS...: a detached process with its log and pid file under WORK
  local name=$1
  shift
  log "starting $name (log: $LOGS/$name.log)"
  # 8>&-: the component must not inherit (and so hold) the up/down lock.
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null 8>&- &
  printf '%s\n' "$!" >"$RUN/$name.pid"
}

stop_pid() { # stop_pid PID: TERM, then KILL after 10 s
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 25); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  log "warning: process $pid did not exit"
}

wait_for() { # wait_for SECONDS WHAT COMMAND...: polls COMMAND until it succeeds
  local timeout=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 1
  done
}

fail_with_log() { # fail_with_log COMPONENT MESSAGE
  log "last lines of $LOGS/$1.log:"
  tail -n 30 "$LOGS/$1.log" >&2 2>/dev/null || true
  die "$2"
}

# --- pki and kubeconfigs --------------------------------------------------------------------

make_cert() { # make_cert NAME SUBJECT [SAN]: a key and a certificate signed by the cluster CA
  local name=$1 subject=$2 san=${3:-} ext="$PKI/$1.ext"
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subject" -out "$PKI/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [ -n "$san" ]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$san"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 30 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

make_pki() {
  log "making the cluster CA, certificates and service-account signing key (openssl)"
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  openssl genrsa -out "$PKI/ca.key" 2048 2>/dev/null
  openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=consul-registrar-e2e-ca" -days 30 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$PKI/ca.crt" 2>/dev/null
  make_cert kube-apiserver "/CN=kube-apiserver" \
    "IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  make_cert kubelet-serving "/CN=$NODE_NAME" "IP:$NODE_IP,DNS:$NODE_NAME"
  make_cert admin "/O=system:masters/CN=consul-registrar-e2e-admin"
  make_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  make_cert kube-controller-manager "/CN=system:kube-controller-manager"
  make_cert kube-scheduler "/CN=system:kube-scheduler"
  make_cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  make_cert kube-proxy "/CN=system:kube-proxy"
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
}

make_kubeconfig() { # make_kubeconfig NAME: $CONF/NAME.kubeconfig with the client cert pki/NAME
  local name=$1 out
  out=$CONF/$name.kubeconfig
  [ "$name" = admin ] && out=$KUBECONFIG_ADMIN
  cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $NODE_NAME
  cluster:
    certificate-authority: $PKI/ca.crt
    server: https://$NODE_IP:$API_PORT
users:
- name: $name
  user:
    client-certificate: $PKI/$name.crt
    client-key: $PKI/$name.key
contexts:
- name: $NODE_NAME
  context:
    cluster: $NODE_NAME
    user: $name
current-context: $NODE_NAME
EOF
}

# --- images ---------------------------------------------------------------------------------

buildah_() {
  buildah --root "$cache_root/buildah/root" --runroot "$cache_root/buildah/runroot" --storage-driver vfs "$@"
}

# build_image NAME ARCHIVE FILE:DEST... -- CONFIG-ARGS: a FROM-scratch image of static files,
# written as a docker-archive (cached: the archive's name carries the inputs' digest).
build_image() {
  local name=$1 archive=$2 ctr spec
  shift 2
  mkdir -p "$(dirname "$archive")"
  ctr=$(buildah_ from scratch)
  while [ "$1" != -- ]; do
    spec=$1
    buildah_ copy --chmod 0755 "$ctr" "${spec%%:*}" "${spec#*:}" >/dev/null
    shift
  done
  shift
  buildah_ config "$@" "$ctr"
  buildah_ commit --quiet --rm --format docker "$ctr" "$name" >/dev/null
  rm -f "$archive.tmp"
  buildah_ push --quiet "$name" "docker-archive:$archive.tmp:$name" >&2
  buildah_ rmi "$name" >/dev/null
  mv "$archive.tmp" "$archive"
}

ensure_images() {
  local images="$cache_root/kubernetes/images" digest pause_tar coredns_tar tmp
  digest=$(sha256sum "$here/pause.c" | cut -c1-12)
  pause_tar="$images/pause-$digest.tar"
  coredns_tar="$images/coredns-$COREDNS_VERSION.tar"
  if [ ! -f "$pause_tar" ]; then
    log "building the sandbox image $PAUSE_IMAGE from tests/e2e/cluster/pause.c (gcc -static, buildah)"
    tmp=$(mktemp -d)
    gcc -static -O2 -o "$tmp/pause" "$here/pause.c" || die "gcc -static pause.c failed"
    build_image "$PAUSE_IMAGE" "$pause_tar" "$tmp/pause:/pause" -- --entrypoint '["/pause"]' --user 65535:65535
    rm -rf "$tmp"
  fi
  if [ ! -f "$coredns_tar" ]; then
    log "building the CoreDNS image $COREDNS_IMAGE (buildah)"
    build_image "$COREDNS_IMAGE" "$coredns_tar" "$BIN/coredns:/coredns" -- --entrypoint '["/coredns"]' --port 53/udp
  fi
  load_archives "$pause_tar" "$coredns_tar"
}

load_archives() {
  local a
  for a in "$@"; do
    [ -f "$a" ] || die "no such image archive: $a"
    log "importing $a into the node's containerd"
    ctr_node images import "$a" >&2 || die "ctr images import $a failed"
  done
}

# --- configuration files --------------------------------------------------------------------

write_configs() {
  mkdir -p "$CONF" "$WORK/cni/net.d" "$WORK/cni/ipam" "$WORK/containerd/root" "$WORK/containerd/state" \
    "$RUN/runc" "$WORK/kubelet" "$WORK/pod-logs" "$WORK/etcd"
  cat >"$CONF/containerd.toml" <<EOF
version = 2
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$RUN/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$WORK/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # The sandbox lacks CAP_SYS_RESOURCE: without this every sandbox fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # Pod network namespaces under the work directory too (not /run/netns), so that down finds them.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$RUN/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$WORK/cni/net.d"
EOF
  cat >"$WORK/cni/net.d/10-$CNI_NETWORK.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$WORK/cni/ipam",
        "ranges": [[{ "subnet": "$NODE_POD_CIDR", "gateway": "$POD_GATEWAY" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
  cat >"$CONF/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: true }
  x509: { clientCAFile: $PKI/ca.crt }
authorization:
  mode: Webhook
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
# No upstream resolver: pods resolve cluster names only (no traffic leaves for the host's DNS).
resolvConf: ""
containerRuntimeEndpoint: unix://$SOCK
imageServiceEndpoint: unix://$SOCK
podCIDR: $NODE_POD_CIDR
podLogsDir: $WORK/pod-logs
# The host is cgroup v1 (hybrid) with swap; the sandbox has no systemd.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
# Images come from local archives and cannot be pulled again: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 2%
  imagefs.available: 2%
  nodefs.inodesFree: 2%
serializeImagePulls: false
EOF
  cat >"$CONF/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
clusterCIDR: $POD_CIDR
clientConnection:
  kubeconfig: $CONF/kube-proxy.kubeconfig
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# NodePorts only on the node's own address, never on the host's.
nodePortAddresses: ["$NODE_IP/32"]
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
}

coredns_manifest() {
  cat <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: { name: coredns, namespace: kube-system }
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: { name: "system:coredns" }
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: { name: "system:coredns" }
roleRef: { apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns" }
subjects:
- { kind: ServiceAccount, name: coredns, namespace: kube-system }
---
apiVersion: v1
kind: ConfigMap
metadata: { name: coredns, namespace: kube-system }
data:
  Corefile: |
    .:53 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 30
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: coredns, namespace: kube-system, labels: { k8s-app: kube-dns } }
spec:
  replicas: 1
  selector: { matchLabels: { k8s-app: kube-dns } }
  template:
    metadata: { labels: { k8s-app: kube-dns } }
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      containers:
      - name: coredns
        image: $COREDNS_IMAGE
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - { name: dns, containerPort: 53, protocol: UDP }
        - { name: dns-tcp, containerPort: 53, protocol: TCP }
        readinessProbe:
          httpGet: { path: /ready, port: 8181 }
          periodSeconds: 2
        livenessProbe:
          httpGet: { path: /health, port: 8080 }
          periodSeconds: 10
          failureThreshold: 5
        resources:
          requests: { cpu: 50m, memory: 40Mi }
          limits: { memory: 170Mi }
        volumeMounts:
        - { name: config, mountPath: /etc/coredns, readOnly: true }
      volumes:
      - name: config
        configMap: { name: coredns }
---
apiVersion: v1
kind: Service
metadata: { name: kube-dns, namespace: kube-system, labels: { k8s-app: kube-dns } }
spec:
  selector: { k8s-app: kube-dns }
  clusterIP: $DNS_IP
  ports:
  - { name: dns, port: 53, protocol: UDP }
  - { name: dns-tcp, port: 53, protocol: TCP }
EOF
}

# --- checks ---------------------------------------------------------------------------------

node_ready() {
  [ "$(kubectl_admin get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

dns_answers() {
  [ "$(dig +short +time=1 +tries=1 @"$DNS_IP" kubernetes.default.svc.cluster.local A 2>/dev/null)" = "$API_SERVICE_IP" ]
}

is_up() {
  local c
  for c in "${COMPONENTS[@]}"; do pid_of "$c" >/dev/null || return 1; done
  [ -x "$BIN/kubectl" ] && node_ready && dns_answers
}

leftovers() { # prints what a previous run left behind
  local c
  [ -d "$WORK" ] && echo "work directory $WORK"
  ip link show "$NODE_LINK" >/dev/null 2>&1 && echo "interface $NODE_LINK"
  ip link show "$BRIDGE" >/dev/null 2>&1 && echo "bridge $BRIDGE"
  for c in "${COMPONENTS[@]}"; do pid_of "$c" >/dev/null && echo "process $c"; done
  return 0
}

# --- up -------------------------------------------------------------------------------------

setup_network() {
  local s
  mkdir -p "$RUN"
  for s in "${SYSCTLS[@]}"; do printf '%s=%s\n' "$s" "$(sysctl -n "$s")"; done >"$RUN/sysctl.saved"
  sysctl -q -w net.ipv4.ip_forward=1
  if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
    [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables)" = 1 ] || sysctl -q -w net.bridge.bridge-nf-call-iptables=1
  else
    log "warning: br_netfilter is not available; pod-to-Service traffic within the bridge may fail"
  fi
  # A dummy interface where the kernel has the module; otherwise (as on this machine) an empty
  # bridge, which holds a local address just as well.
  ip link add "$NODE_LINK" type dummy 2>/dev/null || ip link add "$NODE_LINK" type bridge \
    || die "could not create the interface $NODE_LINK for the node IP"
  ip addr add "$NODE_IP/32" dev "$NODE_LINK" || die "could not add $NODE_IP to $NODE_LINK"
  ip link set "$NODE_LINK" up
  # Host-originated traffic to Services leaves from the node's address (kube-proxy DNATs it to a pod).
  ip route add "$SERVICE_CIDR" dev "$NODE_LINK" src "$NODE_IP"
}

cmd_up() {
  need_root
  ensure_packages
  BIN=$(bash "$repo/scripts/kubernetes.sh") || die "could not provide the Kubernetes binaries (scripts/kubernetes.sh)"
  if is_up; then
    log "the cluster is already up (node $NODE_NAME Ready, DNS answers); nothing to do"
    cmd_env
    return 0
  fi
  local left
  left=$(leftovers)
  if [ -n "$left" ]; then
    log "cleaning up what a previous run left: $(echo "$left" | paste -sd, -)"
    cmd_down
  fi
  local started=$SECONDS
  mkdir -p "$WORK" "$RUN" "$LOGS" "$CONF"
  setup_network
  make_pki
  for k in admin kube-controller-manager kube-scheduler kubelet kube-proxy; do make_kubeconfig "$k"; done
  write_configs

  start etcd "$BIN/etcd" --name "$NODE_NAME" --data-dir "$WORK/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "$NODE_NAME=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
    --quota-backend-bytes 2147483648 --log-level warn
  wait_for 60 "etcd" "$BIN/etcdctl" --endpoints "127.0.0.1:$ETCD_CLIENT_PORT" endpoint health \
    || fail_with_log etcd "etcd did not become healthy"

  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$API_PORT" \
    --tls-cert-file "$PKI/kube-apiserver.crt" --tls-private-key-file "$PKI/kube-apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --allow-privileged=true \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --profiling=false --v 1
  wait_for 120 "kube-apiserver" kubectl_admin get --raw /readyz \
    || fail_with_log kube-apiserver "kube-apiserver did not become ready"

  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$CONF/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$CONF/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$CONF/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --allocate-node-cidrs=true --cluster-cidr "$POD_CIDR" --node-cidr-mask-size 24 \
    --service-cluster-ip-range "$SERVICE_CIDR" --v 1
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$CONF/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$CONF/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$CONF/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --v 1

  start containerd containerd --config "$CONF/containerd.toml"
  wait_for 60 "containerd" ctr --address "$SOCK" version || fail_with_log containerd "containerd did not start"
  ensure_images

  start kubelet "$BIN/kubelet" --config "$CONF/kubelet.yaml" \
    --kubeconfig "$CONF/kubelet.kubeconfig" --root-dir "$WORK/kubelet" --cert-dir "$PKI" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v 1
  start kube-proxy "$BIN/kube-proxy" --config "$CONF/kube-proxy.yaml" --v 1

  log "waiting for node $NODE_NAME to be Ready"
  wait_for 180 "node $NODE_NAME Ready" node_ready || fail_with_log kubelet "node $NODE_NAME did not become Ready"

  log "deploying CoreDNS $COREDNS_VERSION (kube-dns at $DNS_IP)"
  coredns_manifest | kubectl_admin apply -f - >&2 || die "kubectl apply of CoreDNS failed"
  if ! wait_for 180 "CoreDNS answering at $DNS_IP" dns_answers; then
    kubectl_admin -n kube-system get pods -o wide >&2 || true
    kubectl_admin -n kube-system describe pods -l k8s-app=kube-dns >&2 || true
    fail_with_log kubelet "CoreDNS does not answer at $DNS_IP"
  fi
  log "cluster up in $((SECONDS - started)) s: node $NODE_NAME Ready at $NODE_IP, DNS at $DNS_IP"
  cmd_env
}

# --- down -----------------------------------------------------------------------------------

clean_iptables() { # clean_iptables iptables|ip6tables: every KUBE-*/CNI-* chain and the jumps into them
  local ipt=$1 table chains
  command -v "$ipt-save" >/dev/null 2>&1 || return 0
  for table in filter nat mangle raw; do
    mapfile -t chains < <("$ipt-save" -t "$table" 2>/dev/null | sed -n 's/^:\(\(KUBE\|CNI\)-[^ ]*\) .*/\1/p')
    [ ${#chains[@]} -gt 0 ] || continue
    {
      echo "*$table"
      "$ipt-save" -t "$table" | grep -E '^-A [^ ]+ .*-[jg] (KUBE|CNI)-' | grep -vE '^-A (KUBE|CNI)-' | sed 's/^-A /-D /'
      printf -- '-F %s\n' "${chains[@]}"
      printf -- '-X %s\n' "${chains[@]}"
      echo COMMIT
    } | "$ipt-restore" --noflush || log "warning: could not remove the $ipt $table chains: ${chains[*]}"
  done
}

kill_cgroup_tree() { # kills every process in the kubelet's pod cgroups, then removes them
  local dir f pid
  for dir in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [ -d "$dir" ] || continue
    while IFS= read -r f; do
      # The cgroup may vanish while we walk the tree.
      { while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done <"$f"; } 2>/dev/null || true
    done < <(find "$dir" -name cgroup.procs 2>/dev/null)
  done
  sleep 0.5
  for dir in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [ -d "$dir" ] || continue
    find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

cmd_down() {
  need_root
  local c pid m
  # The kubelet first, so that it restarts nothing; then every pod's processes and shims.
  for c in kubelet kube-proxy; do
    if pid=$(pid_of "$c"); then log "stopping $c"; stop_pid "$pid"; fi
  done
  kill_cgroup_tree
  while read -r pid; do
    [ -n "$pid" ] && stop_pid "$pid"
  done < <(ps -eo pid=,args= | awk -v a="-address $SOCK" 'index($0, "containerd-shim") && index($0, a) { print $1 }')
  for c in containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do
    if pid=$(pid_of "$c"); then log "stopping $c"; stop_pid "$pid"; fi
  done
  # Mounts under the work directory: pod volumes, sandbox shm and netns, container rootfs.
  while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "warning: could not unmount $m"
  done < <(awk -v w="$WORK/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
  # Links (deleting the bridge drops its veths), iptables, conntrack entries.
  ip link del "$BRIDGE" 2>/dev/null || true
  ip link del "$NODE_LINK" 2>/dev/null || true
  clean_iptables iptables
  clean_iptables ip6tables
  if command -v conntrack >/dev/null 2>&1; then
    for c in "$POD_CIDR" "$SERVICE_CIDR" "$NODE_IP/32"; do
      conntrack -D -s "$c" >/dev/null 2>&1 || true
      conntrack -D -d "$c" >/dev/null 2>&1 || true
    done
  fi
  # libcni's cache: our network's entries and the loopback entries of the same sandboxes.
  for m in /var/lib/cni/results/"$CNI_NETWORK"-*-eth0; do
    [ -e "$m" ] || continue
    c=${m##*/"$CNI_NETWORK"-}
    rm -f "$m" "/var/lib/cni/results/cni-loopback-${c%-eth0}-lo"
  done
  # Kernel settings back to what they were before `up`.
  if [ -f "$RUN/sysctl.saved" ]; then
    while IFS='=' read -r c m; do sysctl -q -w "$c=$m" 2>/dev/null || true; done <"$RUN/sysctl.saved"
  fi
  rm -rf "$WORK"
  if [ -d "$WORK" ]; then die "could not remove $WORK (is something still mounted under it?)"; fi
  log "down: nothing of the cluster is left (processes, mounts, $BRIDGE, $NODE_LINK, KUBE-/CNI- iptables chains, $WORK)"
}

# --- env, load, status ----------------------------------------------------------------------

cmd_env() {
  [ -f "$KUBECONFIG_ADMIN" ] || die "the cluster is not up (no $KUBECONFIG_ADMIN); run: $0 up"
  printf 'export KUBECONFIG=%s\n' "$KUBECONFIG_ADMIN"
  printf 'export NODE_IP=%s\n' "$NODE_IP"
}

cmd_load() {
  need_root
  [ $# -gt 0 ] || die "usage: $0 load ARCHIVE..."
  ctr --address "$SOCK" version >/dev/null 2>&1 || die "the node's containerd is not running; run: $0 up"
  load_archives "$@"
}

cmd_status() {
  local c pid
  for c in "${COMPONENTS[@]}"; do
    if pid=$(pid_of "$c"); then echo "$c: running (pid $pid)"; else echo "$c: not running"; fi
  done
  if [ -f "$KUBECONFIG_ADMIN" ] && [ -n "${BIN:-}" ] && [ -x "$BIN/kubectl" ]; then
    kubectl_admin get nodes -o wide 2>&1 || true
    kubectl_admin get pods -A -o wide 2>&1 || true
  fi
  if dns_answers; then echo "DNS: answers at $DNS_IP"; else echo "DNS: no answer at $DNS_IP"; fi
}

main() {
  local verb=${1:-}
  [ $# -gt 0 ] && shift
  BIN="$cache_root/kubernetes/v1.34.4/bin"
  case "$verb" in
  up | down)
    # One provisioning at a time (the lock lives outside the work directory, which `down` deletes).
    mkdir -p "$cache_root/kubernetes"
    exec 8>"$cache_root/kubernetes/local-cluster.lock"
    flock -n 8 || {
      log "another local.sh up/down is running; waiting for it"
      flock 8
    }
    ;;
  esac
  case "$verb" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  load) cmd_load "$@" ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 up|down|env|load ARCHIVE...|status" >&2
    exit 2
    ;;
  esac
}

main "$@"
