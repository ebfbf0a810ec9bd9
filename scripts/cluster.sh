#!/usr/bin/env bash
# A one-node Kubernetes cluster on this machine, from real components, for the tests.
#
#   scripts/cluster.sh up       build what is missing (cached), start everything, wait until ready
#   scripts/cluster.sh down     stop everything `up` started and remove what it created (safe twice)
#   scripts/cluster.sh status   say what runs; exit 0 only when the cluster is ready
#   scripts/cluster.sh env      print `export KUBECONFIG=... PATH=...` lines (eval "$(... env)")
#   scripts/cluster.sh build    only build the binaries and images
#   scripts/cluster.sh restart-apiserver
#                               stop kube-apiserver alone (SIGTERM, as a control-plane upgrade
#                               does) and start it again with the same flags; returns once
#                               /readyz answers (tests of watches and streams that survive it)
#
# Components: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy,
# kubectl, etcd (one multi-call binary built from the Go modules in scripts/cluster/kube),
# kube-router's network policy controller (scripts/cluster/kube-router; a DaemonSet), CoreDNS
# (same module as kube-*, its own small image; a Deployment), containerd + runc + CNI plugins
# from Debian.
#
# Environment (all optional):
#   SANDBOX_KERNEL_CLUSTER_CACHE    builds, images, containerd's image store, logs, and the
#                                   running cluster's state (default /var/cache/sandbox-kernel/cluster)
#   SANDBOX_KERNEL_CLUSTER_NODE_IP  the node's address, added to lo (default 10.245.0.1)
#   SANDBOX_KERNEL_CLUSTER_TIMEOUT  seconds `up` waits for the cluster to be ready (default 300)
#
# Root only. Host changes are confined and undone by `down`: the node address on lo, the sysctls
# listed in SAVED_SYSCTLS (restored), iptables-legacy chains named KUBE-*/CNI-* and ipsets
# named KUBE-* (nothing in nftables), /var/lib/kubelet, the kubepods cgroups, pod netns/veths.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$HERE/cluster"
CACHE="${SANDBOX_KERNEL_CLUSTER_CACHE:-/var/cache/sandbox-kernel/cluster}"
BIN="$CACHE/bin"
IMAGES="$CACHE/images"
LOGS="$CACHE/logs"
RUN="$CACHE/run"                       # the running cluster's state; removed by `down`
PKI="$RUN/pki"
PIDS="$RUN/pids"
SOCKDIR=/run/sandbox-kernel-cluster
CONTAINERD_SOCK="$SOCKDIR/containerd.sock"
LEGACY="$CACHE/iptables-legacy"        # iptables* -> iptables-legacy*, first in the components' PATH
KUBELET_DIR=/var/lib/kubelet

K8S_VERSION=v1.34.4
COREDNS_VERSION=1.12.4
NODE_NAME=sandbox-kernel-node
NODE_IP="${SANDBOX_KERNEL_CLUSTER_NODE_IP:-10.245.0.1}"
NODE_LABEL=lo:skcluster
POD_CIDR=10.244.0.0/16
NODE_POD_CIDR=10.244.0.0/24            # the first /24 the controller-manager gives the only node
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
DNS_SERVICE_IP=10.96.0.10
API_PORT=6443
ETCD_PORT=23790
ETCD_PEER_PORT=23800
CNI_NETWORK=sk-pods
PAUSE_IMAGE=sandbox-kernel.local/pause:1
COREDNS_IMAGE="sandbox-kernel.local/coredns:$COREDNS_VERSION"
KUBE_ROUTER_VERSION=v2.1.0
KUBE_ROUTER_IMAGE="sandbox-kernel.local/kube-router:$KUBE_ROUTER_VERSION"
PROBE_IMAGE=sandbox-kernel.local/probe:1   # busybox (Debian's static build), for tests that probe the network
TIMEOUT="${SANDBOX_KERNEL_CLUSTER_TIMEOUT:-300}"
SAVED_SYSCTLS="net.ipv4.ip_forward vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes"
COMPONENTS="containerd etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"

ADMIN_KUBECONFIG="$CACHE/admin.kubeconfig"

log() { printf '%s cluster.sh: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
kubectl() { "$BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }
ctr() { command ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }
component_path() { echo "$LEGACY:$BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"; }

# ---------------------------------------------------------------- prerequisites and build

APT_PACKAGES="containerd runc containernetworking-plugins iptables ipset conntrack openssl"

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it starts a kubelet and changes host networking)"; }

ensure_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [ -x /usr/lib/cni/ptp ] || missing+=(containernetworking-plugins)
  command -v iptables-legacy >/dev/null || missing+=(iptables)
  command -v ipset >/dev/null || missing+=(ipset)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v openssl >/dev/null || missing+=(openssl)
  [ ${#missing[@]} = 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get to install them"
  log "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >"$LOGS/apt.log" 2>&1 \
    || die "apt-get install ${missing[*]} failed (see $LOGS/apt.log)"
}

go_env() {
  export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build"
  export CGO_ENABLED=0 GOFLAGS="-buildvcs=false" GOTOOLCHAIN=local
}

# stamp of a build: the sources, the Go version and the flags; a binary is rebuilt when it changes
build_stamp() { (cd "$1" && cat go.mod go.sum $(find . -name '*.go' | sort) && go version && echo "$2") | sha256sum | cut -c1-16; }

build_binaries() {
  command -v go >/dev/null || die "needs Go (go not in PATH) to build the cluster's components"
  go_env
  mkdir -p "$BIN" "$LOGS"
  local stamp v=k8s.io/component-base/version ldflags
  ldflags="-s -w -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X $v.gitTreeState=clean -X $v.buildDate=1970-01-01T00:00:00Z"
  stamp="$(build_stamp "$SRC/kube" "$ldflags")"
  if [ "$(cat "$BIN/.kube.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -x "$BIN/clusterbin" ]; then
    log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl, etcd, coredns, pause (first time: long)"
    local t0=$SECONDS out="$BIN/.build"
    rm -rf "$out" && mkdir -p "$out"
    (cd "$SRC/kube" && go build -trimpath -ldflags="$ldflags" -o "$out/" . ./pause ./coredns) >"$LOGS/build-kube.log" 2>&1 || die "go build failed (see $LOGS/build-kube.log)"
    mv -f "$out/clusterbin" "$out/pause" "$out/coredns" "$BIN/" && rmdir "$out"
    echo "$stamp" >"$BIN/.kube.stamp"
    log "built in $((SECONDS - t0))s"
  fi
  local c
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd; do
    ln -sfn clusterbin "$BIN/$c"
  done
  ldflags="-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION"
  stamp="$(build_stamp "$SRC/kube-router" "$ldflags")"
  if [ "$(cat "$BIN/.kube-router.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -x "$BIN/kube-router" ]; then
    log "building kube-router"
    local t0=$SECONDS
    (cd "$SRC/kube-router" && go build -trimpath -ldflags="$ldflags" -o "$BIN/kube-router.new" \
      github.com/cloudnativelabs/kube-router/v2/cmd/kube-router) >"$LOGS/build-kube-router.log" 2>&1 \
      || die "go build of kube-router failed (see $LOGS/build-kube-router.log)"
    mv -f "$BIN/kube-router.new" "$BIN/kube-router"
    echo "$stamp" >"$BIN/.kube-router.stamp"
    log "built kube-router in $((SECONDS - t0))s"
  fi
}

oci_image() {  # oci_image ARCHIVE-NAME OCIIMAGE-ARGS...: write $IMAGES/ARCHIVE-NAME.tar
  local out="$IMAGES/$1.tar"; shift
  python3 "$SRC/ociimage.py" --out "$out.new" "$@" || die "could not write the image archive $out"
  mv -f "$out.new" "$out"
}

build_images() {
  mkdir -p "$IMAGES"
  if [ ! -s "$IMAGES/pause.tar" ] || [ "$BIN/pause" -nt "$IMAGES/pause.tar" ]; then
    oci_image pause --name "$PAUSE_IMAGE" --entrypoint '["/pause"]' --user 65535:65535 --file "$BIN/pause:/pause:0755"
  fi
  if [ ! -s "$IMAGES/coredns.tar" ] || [ "$BIN/coredns" -nt "$IMAGES/coredns.tar" ]; then
    oci_image coredns --name "$COREDNS_IMAGE" --entrypoint '["/coredns"]' --file "$BIN/coredns:/coredns:0755"
  fi
  if [ ! -s "$IMAGES/kube-router.tar" ] || [ "$BIN/kube-router" -nt "$IMAGES/kube-router.tar" ]; then
    # kube-router execs iptables(-save/-restore) and ipset: the host's legacy iptables and
    # ipset with their libraries, so that the DaemonSet and kube-proxy share one iptables
    local -A seen=() && local args=() f t
    for f in /usr/sbin/xtables-legacy-multi /usr/sbin/ipset \
             $(ldd /usr/sbin/xtables-legacy-multi /usr/sbin/ipset | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/lib/ {print $1}'); do
      [ -n "${seen[$f]:-}" ] && continue
      seen[$f]=1 && args+=(--file "$f:$f:0755")
    done
    for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
      args+=(--link "xtables-legacy-multi:/usr/sbin/$t")
    done
    oci_image kube-router --name "$KUBE_ROUTER_IMAGE" --entrypoint '["/usr/local/bin/kube-router"]' \
      --file "$BIN/kube-router:/usr/local/bin/kube-router:0755" \
      --tree /usr/lib/x86_64-linux-gnu/xtables:/usr/lib/x86_64-linux-gnu/xtables \
      --env LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu "${args[@]}"
  fi
  if [ ! -s "$IMAGES/probe.tar" ]; then
    local debs="$CACHE/debs"
    rm -rf "$debs" && mkdir -p "$debs/x"
    (cd "$debs" && apt-get download busybox-static) >"$LOGS/probe-image.log" 2>&1 \
      || die "apt-get download busybox-static failed (see $LOGS/probe-image.log)"
    dpkg-deb -x "$debs"/busybox-static_*.deb "$debs/x"
    oci_image probe --name "$PROBE_IMAGE" --entrypoint '["/bin/busybox"]' --file "$debs/x/bin/busybox:/bin/busybox:0755"
    rm -rf "$debs"
  fi
}

ensure_legacy_iptables() {
  mkdir -p "$LEGACY"
  local t
  for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -sfn "/usr/sbin/${t/tables/tables-legacy}" "$LEGACY/$t"
  done
}

# ---------------------------------------------------------------- processes

pid_of() {  # the pid of a component we started, if it still runs that component
  local f="$PIDS/$1" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  [ -d "/proc/$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$1" && echo "$pid"
}

start() {  # start NAME CMD ARGS... in the background, its log in $LOGS/NAME.log
  local name="$1"; shift
  if pid_of "$name" >/dev/null; then return 0; fi
  mkdir -p "$PIDS" "$LOGS"
  log "starting $name"
  # shellcheck disable=SC2094
  # 9>&-: the lock of `lock` must not live on in the components
  PATH="$(component_path)" setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$PIDS/$name"
}

stop() {
  local name="$1" pid i
  pid="$(pid_of "$name")" || { rm -f "$PIDS/$name"; return 0; }
  log "stopping $name ($pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null
  rm -f "$PIDS/$name"
}

wait_for() {  # wait_for WHAT SECONDS CMD...: retry CMD until it succeeds
  local what="$1" secs="$2" deadline; shift 2
  deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out after ${secs}s waiting for $what (logs in $LOGS)"
    sleep 0.5
  done
}

port_free() { ! (echo >"/dev/tcp/$1/$2") 2>/dev/null; }

# ---------------------------------------------------------------- host setup

save_sysctls() {
  [ -f "$RUN/saved-sysctls" ] && return 0
  local s
  for s in $SAVED_SYSCTLS; do echo "$s=$(sysctl -n "$s")"; done >"$RUN/saved-sysctls"
}

host_setup() {
  mkdir -p "$RUN" "$SOCKDIR"
  save_sysctls
  sysctl -qw net.ipv4.ip_forward=1
  # on lo (this kernel has no dummy interfaces): an address no host route or test range uses
  ip -4 addr show dev lo | grep -qF " $NODE_IP/32 " || ip addr add "$NODE_IP/32" dev lo label "$NODE_LABEL"
}

# ---------------------------------------------------------------- certificates and kubeconfigs

sign() {  # sign NAME SUBJECT EXTENSIONS: key + certificate signed by the cluster CA
  local name="$1" subject="$2" ext="$3"
  [ -s "$PKI/$name.crt" ] && return 0
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/$name.key" 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subject" -out "$PKI/$name.csr" 2>/dev/null
  printf '%b\n' "$ext" >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 365 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

client_ext="keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
server_ext="keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth"

make_kubeconfig() {  # make_kubeconfig FILE CERT-NAME
  local file="$1" name="$2"
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sandbox-kernel
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/$name.crt")
    client-key-data: $(base64 -w0 <"$PKI/$name.key")
contexts:
- name: sandbox-kernel
  context: {cluster: sandbox-kernel, user: $name}
current-context: sandbox-kernel
EOF
  chmod 600 "$file"
}

make_pki() {
  mkdir -p "$PKI" && chmod 700 "$PKI"
  if [ ! -s "$PKI/ca.crt" ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=sandbox-kernel-test-cluster-ca" -days 365 \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -out "$PKI/ca.crt" 2>/dev/null
  fi
  if [ ! -s "$PKI/sa.key" ]; then  # service-account token signing keys
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  fi
  sign apiserver "/CN=kube-apiserver" "$server_ext\nsubjectAltName=IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client_ext"
  sign kubelet-server "/CN=$NODE_NAME" "$server_ext\nsubjectAltName=IP:$NODE_IP,DNS:$NODE_NAME"
  sign admin "/O=system:masters/CN=sandbox-kernel-cluster-admin" "$client_ext"
  sign controller-manager "/CN=system:kube-controller-manager" "$client_ext"
  sign scheduler "/CN=system:kube-scheduler" "$client_ext"
  sign kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "$client_ext"
  sign kube-proxy "/CN=system:kube-proxy" "$client_ext"
  local c
  for c in controller-manager scheduler kubelet kube-proxy; do
    make_kubeconfig "$RUN/$c.kubeconfig" "$c"
  done
  make_kubeconfig "$ADMIN_KUBECONFIG" admin
}

# ---------------------------------------------------------------- configuration files

put() {  # put FILE: stdin into FILE unless FILE has that content already (kube-proxy exits when its config changes)
  local tmp="$1.new"
  cat >"$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; fi
}

write_configs() {
  mkdir -p "$RUN/cni" "$CACHE/containerd"
  local RESTRICT_OOM=false  # CAP_SYS_RESOURCE is bit 24 of the capability sets
  (( (0x$(awk '/^CapEff/ {print $2}' /proc/self/status) >> 24) & 1 )) || RESTRICT_OOM=true
  put "$RUN/cni/10-$CNI_NETWORK.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "mtu": 1500,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$NODE_POD_CIDR"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  put "$RUN/containerd.toml" <<EOF
version = 2
root = "$CACHE/containerd"
state = "$SOCKDIR/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$CACHE/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # this machine's root has no CAP_SYS_RESOURCE: no oom_score_adj below containerd's own
  restrict_oom_score_adj = $RESTRICT_OOM
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "$(command -v runc)"
        Root = "$SOCKDIR/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$RUN/cni"
EOF
  put "$RUN/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
address: "$NODE_IP"
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
tlsCertFile: "$PKI/kubelet-server.crt"
tlsPrivateKeyFile: "$PKI/kubelet-server.key"
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: "unix://$CONTAINERD_SOCK"
clusterDNS: ["$DNS_SERVICE_IP"]
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
rotateCertificates: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
EOF
  put "$RUN/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$RUN/kube-proxy.kubeconfig"}
mode: iptables
clusterCIDR: "$POD_CIDR"
hostnameOverride: "$NODE_NAME"
bindAddress: "$NODE_IP"
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$NODE_IP/32"]
iptables: {localhostNodePorts: false}
# 0 leaves the host's conntrack settings as they are
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# ---------------------------------------------------------------- components

start_containerd() {
  start containerd containerd --config "$RUN/containerd.toml"
  wait_for containerd 60 ctr version
}

import_images() {  # every archive in $IMAGES not yet imported (or changed since)
  local tar key list="$CACHE/containerd/.imported"
  touch "$list"
  for tar in "$IMAGES"/*.tar; do
    [ -f "$tar" ] || continue
    key="$(basename "$tar") $(stat -c '%s %Y' "$tar")"
    grep -qxF "$key" "$list" && continue
    log "importing image archive $(basename "$tar")"
    ctr images import --all-platforms "$tar" >>"$LOGS/images.log" 2>&1 \
      || die "ctr images import $tar failed (see $LOGS/images.log)"
    grep -vF "$(basename "$tar") " "$list" >"$list.new" || true
    echo "$key" >>"$list.new" && mv -f "$list.new" "$list"
  done
}

start_etcd() {
  port_free 127.0.0.1 "$ETCD_PORT" || pid_of etcd >/dev/null || die "port $ETCD_PORT is taken (etcd)"
  start etcd "$BIN/etcd" --name "$NODE_NAME" --data-dir "$RUN/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "$NODE_NAME=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn
  wait_for etcd 60 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"
}

start_apiserver() {
  port_free "$NODE_IP" "$API_PORT" || pid_of kube-apiserver >/dev/null || die "port $API_PORT is taken (kube-apiserver)"
  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --advertise-address "$NODE_IP" --bind-address 0.0.0.0 --secure-port "$API_PORT" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --allow-privileged=true --profiling=false --v=1
  wait_for kube-apiserver 120 apiserver_ready
}

apiserver_ready() {
  curl -fsS --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "https://$NODE_IP:$API_PORT/readyz"
}

start_control_plane() {
  start_apiserver
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$RUN/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$RUN/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$RUN/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --root-ca-file "$PKI/ca.crt" --service-account-private-key-file "$PKI/sa.key" \
    --use-service-account-credentials \
    --allocate-node-cidrs --cluster-cidr "$POD_CIDR" --node-cidr-mask-size 24 \
    --service-cluster-ip-range "$SERVICE_CIDR" --profiling=false --v=1
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$RUN/scheduler.kubeconfig" \
    --authentication-kubeconfig "$RUN/scheduler.kubeconfig" \
    --authorization-kubeconfig "$RUN/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --profiling=false --v=1
}

start_node() {
  start kubelet "$BIN/kubelet" --config "$RUN/kubelet.yaml" --kubeconfig "$RUN/kubelet.kubeconfig" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --root-dir "$KUBELET_DIR" --v=1
  start kube-proxy "$BIN/kube-proxy" --config "$RUN/kube-proxy.yaml" --v=1
  # kube-router (network policies) and CoreDNS run as pods: scripts/cluster/addons.yaml
}

node_ready() {
  [ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

dns_ready() {
  [ "$(kubectl -n kube-system get deploy coredns -o jsonpath='{.status.readyReplicas}')" = 1 ]
}

policy_ready() {
  [ "$(kubectl -n kube-system get daemonset kube-router -o jsonpath='{.status.numberReady}')" = 1 ]
}

apply_addons() {
  sed -e "s|@DNS_SERVICE_IP@|$DNS_SERVICE_IP|g" -e "s|@COREDNS_IMAGE@|$COREDNS_IMAGE|g" \
    -e "s|@KUBE_ROUTER_IMAGE@|$KUBE_ROUTER_IMAGE|g" -e "s|@SERVICE_CIDR@|$SERVICE_CIDR|g" \
    "$SRC/addons.yaml" | kubectl apply -f - >>"$LOGS/addons.log"
}

write_env() {
  cat >"$CACHE/env" <<EOF
export KUBECONFIG="$ADMIN_KUBECONFIG"
export PATH="$BIN:\$PATH"
EOF
}

# ---------------------------------------------------------------- commands

cmd_build() {
  need_root
  mkdir -p "$CACHE" "$LOGS"
  ensure_packages   # the kube-router image carries the host's iptables-legacy and ipset
  build_binaries
  build_images
}

cmd_up() {
  need_root
  local t0=$SECONDS
  mkdir -p "$CACHE" "$LOGS" "$RUN"
  ensure_packages
  build_binaries
  build_images
  ensure_legacy_iptables
  host_setup
  make_pki
  write_configs
  start_containerd
  import_images
  start_etcd
  start_control_plane
  apply_addons
  start_node
  wait_for "node $NODE_NAME Ready" "$TIMEOUT" node_ready
  wait_for "CoreDNS ready" "$TIMEOUT" dns_ready
  wait_for "kube-router ready" "$TIMEOUT" policy_ready
  write_env
  log "cluster up in $((SECONDS - t0))s: export KUBECONFIG=$ADMIN_KUBECONFIG (or eval \"\$($0 env)\")"
}

pod_netns_paths() {  # the network namespaces containerd made for pods (from the sandbox specs)
  ctr containers list -q 2>/dev/null | while read -r id; do
    ctr containers info "$id" 2>/dev/null | python3 -c '
import json, sys
spec = json.load(sys.stdin).get("Spec") or {}
for ns in (spec.get("linux") or {}).get("namespaces") or []:
    if ns.get("type") == "network" and ns.get("path", "").startswith("/var/run/netns/cni-"):
        print(ns["path"])' || true
  done | sort -u
}

remove_containers() {
  [ -S "$CONTAINERD_SOCK" ] && ctr version >/dev/null 2>&1 || return 0
  local netns id
  netns="$(pod_netns_paths || true)"
  for id in $(ctr tasks list -q 2>/dev/null); do ctr tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
  sleep 1
  for id in $(ctr tasks list -q 2>/dev/null); do ctr tasks delete -f "$id" >/dev/null 2>&1 || true; done
  for id in $(ctr containers list -q 2>/dev/null); do ctr containers delete "$id" >/dev/null 2>&1 || true; done
  for id in $netns; do umount "$id" 2>/dev/null || true; rm -f "$id"; done
}

kill_our_shims() {  # shims outlive containerd; ours name our socket on their command line
  local pid
  for pid in $(pgrep -f -- "-address $CONTAINERD_SOCK" || true); do kill -KILL "$pid" 2>/dev/null || true; done
}

clean_iptables() {  # chains named KUBE-*/CNI-* in the legacy tables (ours: nothing else uses legacy here)
  PATH="$(component_path)" "$BIN/kube-proxy" --cleanup >>"$LOGS/kube-proxy.log" 2>&1 || true
  local cmd table chain rule
  for cmd in iptables-legacy ip6tables-legacy; do
    command -v "$cmd" >/dev/null || continue
    for table in filter nat mangle raw; do
      { "$cmd" -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j (KUBE|CNI)-' | grep -vE '^-A (KUBE|CNI)-' || true; } \
        | while read -r rule; do
            eval "$cmd -t $table -D ${rule#-A }" 2>/dev/null || true
          done
      for chain in $("$cmd" -t "$table" -S 2>/dev/null | awk '/^-N (KUBE|CNI)-/ {print $2}'); do
        "$cmd" -t "$table" -F "$chain" 2>/dev/null || true
      done
      for chain in $("$cmd" -t "$table" -S 2>/dev/null | awk '/^-N (KUBE|CNI)-/ {print $2}'); do
        "$cmd" -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
  local set
  for set in $(ipset list -n 2>/dev/null | grep -E '^(inet6:)?KUBE-' || true); do
    ipset destroy "$set" 2>/dev/null || true
  done
}

clean_kubelet_dir() {
  [ -d "$KUBELET_DIR" ] || return 0
  local m
  for m in $(awk -v d="$KUBELET_DIR" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf "$KUBELET_DIR"
}

unmount_under() {  # every mount point below the given directories, deepest first
  local m d
  for d in "$@"; do
    for m in $(awk -v d="$d/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
      umount -l "$m" 2>/dev/null || true
    done
  done
}

clean_cgroups() {  # the kubepods hierarchy the kubelet made under each cgroup v1 controller
  local d
  for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [ -d "$d" ] || continue
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
}

restore_sysctls() {
  [ -f "$RUN/saved-sysctls" ] || return 0
  local line
  while read -r line; do sysctl -qw "$line" 2>/dev/null || true; done <"$RUN/saved-sysctls"
}

cmd_down() {
  need_root
  local c
  for c in kube-proxy kube-scheduler kube-controller-manager kubelet; do stop "$c"; done
  remove_containers
  stop containerd
  kill_our_shims
  for c in kube-apiserver etcd; do stop "$c"; done
  clean_iptables
  clean_kubelet_dir
  clean_cgroups
  rm -rf "/var/lib/cni/networks/$CNI_NETWORK" /var/lib/cni/results/"$CNI_NETWORK"-* /var/log/pods /var/log/containers
  ip addr del "$NODE_IP/32" dev lo 2>/dev/null || true
  restore_sysctls
  unmount_under "$SOCKDIR" "$CACHE"   # sandbox shm mounts, container rootfs overlays
  rm -rf "$RUN" "$SOCKDIR" "$ADMIN_KUBECONFIG" "$CACHE/env"
  log "cluster down"
}

cmd_restart_apiserver() {  # stop kube-apiserver only and start it again with the same flags
  need_root
  pid_of kube-apiserver >/dev/null || die "kube-apiserver is not running: nothing to restart (run $0 up)"
  local t0 down
  t0="$(now_ms)"
  stop kube-apiserver
  down="$(now_ms)"
  start_apiserver
  log "kube-apiserver restarted: stopped in $((down - t0)) ms, ready again $(($(now_ms) - t0)) ms after the stop began"
  # the other components reconnect by themselves; return once `status` would say ready again
  wait_for "node $NODE_NAME Ready after the restart" "$TIMEOUT" node_ready
  wait_for "CoreDNS ready after the restart" "$TIMEOUT" dns_ready
  wait_for "kube-router ready after the restart" "$TIMEOUT" policy_ready
}

now_ms() { local t="$EPOCHREALTIME"; echo $(( ${t/./} / 1000 )); }

cmd_status() {
  local c pid ok=0
  for c in $COMPONENTS; do
    if pid="$(pid_of "$c")"; then echo "$c: running (pid $pid)"; else echo "$c: not running"; ok=1; fi
  done
  if [ -f "$ADMIN_KUBECONFIG" ] && node_ready 2>/dev/null; then echo "node $NODE_NAME: Ready"; else echo "node: not ready"; ok=1; fi
  if [ -f "$ADMIN_KUBECONFIG" ] && dns_ready 2>/dev/null; then echo "coredns: ready"; else echo "coredns: not ready"; ok=1; fi
  if [ -f "$ADMIN_KUBECONFIG" ] && policy_ready 2>/dev/null; then echo "kube-router: ready"; else echo "kube-router: not ready"; ok=1; fi
  [ $ok = 0 ] && echo "KUBECONFIG=$ADMIN_KUBECONFIG"
  return $ok
}

cmd_env() {
  [ -f "$ADMIN_KUBECONFIG" ] || die "no cluster: run $0 up"
  echo "export KUBECONFIG=\"$ADMIN_KUBECONFIG\""
  echo "export PATH=\"$BIN:\$PATH\""
}

lock() {  # one up/down/build at a time on this machine (several people share it)
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock -n 9 || { log "waiting for another cluster.sh up/down/build to finish"; flock 9; }
}

case "${1:-}" in
  up) lock; cmd_up ;;
  down) lock; cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  build) lock; cmd_build ;;
  restart-apiserver) lock; cmd_restart_apiserver ;;
  *) echo "usage: $0 up|down|status|env|build|restart-apiserver" >&2; exit 2 ;;
esac
