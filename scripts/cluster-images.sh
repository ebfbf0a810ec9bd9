#!/usr/bin/env bash
# Build what the test cluster needs besides the cluster itself, with no registry:
#
#   bash scripts/cluster-images.sh [all|sandbox|helm|name|status]
#
#   sandbox  the sandbox image: Debian (debootstrap --variant=minbase) + python3 + IPython, user
#            sandbox (uid/gid 1000), packed by scripts/cluster/rootfs_image.py as an OCI image archive at
#            $CACHE/images/sandbox.tar, named $SANDBOX_IMAGE (scripts/cluster.sh up imports every
#            $CACHE/images/*.tar into containerd's k8s.io namespace)
#   helm     the Helm CLI built from the helm.sh/helm/v3 Go module into $CACHE/bin/helm
#   name     print the sandbox image's name (what tests set c.KubernetesBackend.image to)
#   status   what is built, and whether it is current
#
# Both are cached: a second run only compares a hash of the inputs (this script, the packer, the
# Debian suite and package list, the Helm version) with the one the last build recorded.
# CACHE is $SANDBOX_KERNEL_CLUSTER_CACHE, by default /var/cache/sandbox-kernel/cluster.
# The agent is not baked in: the Kubernetes backend mounts it from a ConfigMap at
# /opt/sandbox-agent (images/sandbox/Dockerfile, for real deployments, bakes it as well).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SANDBOX_KERNEL_CLUSTER_CACHE:-/var/cache/sandbox-kernel/cluster}"
SANDBOX_IMAGE="${SANDBOX_KERNEL_CLUSTER_SANDBOX_IMAGE:-sandbox-kernel.local/sandbox:cluster}"
SUITE="bookworm"
PACKAGES="python3-ipython"
HELM_VERSION="v3.19.5"
HELM_K8S_MINOR="34"  # the k8s.io modules helm v3.19 links (its default for `helm template`)
export GOMODCACHE="${GOMODCACHE_OVERRIDE:-$CACHE/go/mod}" GOCACHE="${GOCACHE_OVERRIDE:-$CACHE/go/build}"
export GOFLAGS="${GOFLAGS:-} -trimpath"

log() { echo "cluster-images: $*" >&2; }

# The Debian mirror apt on this machine uses (deb822 sources first, then sources.list).
debian_mirror() {
  local uri
  uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  [ -n "$uri" ] || uri="$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

sandbox_inputs_hash() {
  { cat "$repo/scripts/cluster-images.sh" "$repo/scripts/cluster/rootfs_image.py"; echo "$SUITE $PACKAGES $SANDBOX_IMAGE"; } \
    | sha256sum | cut -c1-16
}

sandbox_current() {
  [ -f "$CACHE/images/sandbox.tar" ] && [ -f "$CACHE/images/sandbox.stamp" ] \
    && [ "$(sed -n 1p "$CACHE/images/sandbox.stamp")" = "$(sandbox_inputs_hash)" ]
}

build_sandbox() {
  if sandbox_current; then
    log "sandbox image $SANDBOX_IMAGE is current ($CACHE/images/sandbox.tar)"
    return 0
  fi
  command -v debootstrap >/dev/null || { log "installing debootstrap"; apt-get update -qq; apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
  [ "$(id -u)" = 0 ] || { log "building the sandbox image needs root (debootstrap)"; return 1; }
  local started root mirror
  started=$(date +%s)
  mkdir -p "$CACHE/images" "$CACHE/debootstrap-debs" "$CACHE/tmp"
  work="$(mktemp -d "$CACHE/tmp/sandbox.XXXXXX")"  # global: the EXIT trap reads it
  trap 'rm -rf "$work"' EXIT
  root="$work/rootfs"
  mirror="$(debian_mirror)"
  log "debootstrap $SUITE (minbase + $PACKAGES) from $mirror"
  debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$CACHE/debootstrap-debs" \
    "$SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; log "debootstrap failed"; return 1; }
  chroot "$root" groupadd --gid 1000 sandbox
  chroot "$root" useradd --uid 1000 --gid 1000 --home-dir /home/sandbox --create-home \
    --shell /usr/sbin/nologin sandbox
  mkdir -p "$root/opt/sandbox-agent"
  chroot "$root" python3 -c 'import IPython, sys; print("IPython", IPython.__version__, "on", sys.version.split()[0])' >&2
  # what a container never needs: package caches and lists, docs, translations, logs, the
  # build host's resolver and identity (the kubelet provides /etc/resolv.conf and /etc/hosts)
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
    "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.cache
  : >"$root/etc/resolv.conf"
  : >"$root/etc/machine-id"
  echo sandbox >"$root/etc/hostname"
  python3 "$repo/scripts/cluster/rootfs_image.py" "$root" "$CACHE/images/sandbox.tar" --name "$SANDBOX_IMAGE" \
    --user 1000:1000 --workdir /home/sandbox \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env HOME=/home/sandbox --env PYTHONUNBUFFERED=1 --env LANG=C.UTF-8 \
    --cmd python3 /opt/sandbox-agent/agent.pyz serve --socket /tmp/.sandbox-agent.sock >"$work/pack.json"
  { sandbox_inputs_hash; echo "$SANDBOX_IMAGE"; cat "$work/pack.json"; } >"$CACHE/images/sandbox.stamp"
  rm -rf "$work"
  trap - EXIT
  log "sandbox image $SANDBOX_IMAGE: $(du -h "$CACHE/images/sandbox.tar" | cut -f1) archive," \
    "built in $(( $(date +%s) - started )) s"
}

build_helm() {
  local bin="$CACHE/bin/helm"
  if [ -x "$bin" ] && [ "$(cat "$bin.version" 2>/dev/null)" = "$HELM_VERSION 1.$HELM_K8S_MINOR" ]; then
    log "helm $HELM_VERSION is current ($bin)"
    return 0
  fi
  command -v go >/dev/null || { log "building helm needs Go (with the Go module proxy)"; return 1; }
  local started
  started=$(date +%s)
  mkdir -p "$CACHE/bin"
  log "building helm $HELM_VERSION from helm.sh/helm/v3 (Go caches in $CACHE/go)"
  # what helm's own Makefile stamps in: its version, and the Kubernetes version `helm template`
  # and `helm lint` assume without a cluster (else v1.20, which the chart's kubeVersion refuses)
  local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  local pkg
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$HELM_K8S_MINOR"
  done
  (cd "$CACHE" && GOBIN="$CACHE/bin" go install -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
  echo "$HELM_VERSION 1.$HELM_K8S_MINOR" >"$bin.version"
  log "helm $HELM_VERSION built in $(( $(date +%s) - started )) s"
}

status() {
  if sandbox_current; then echo "sandbox image: $SANDBOX_IMAGE current ($(du -h "$CACHE/images/sandbox.tar" | cut -f1))"
  else echo "sandbox image: $SANDBOX_IMAGE not built or stale"; fi
  if [ -x "$CACHE/bin/helm" ]; then echo "helm: $(cat "$CACHE/bin/helm.version" 2>/dev/null) at $CACHE/bin/helm"
  else echo "helm: not built"; fi
}

case "${1:-all}" in
  all) build_sandbox; build_helm ;;
  sandbox) build_sandbox ;;
  helm) build_helm ;;
  name) echo "$SANDBOX_IMAGE" ;;
  status) status ;;
  *) echo "usage: $0 [all|sandbox|helm|name|status]" >&2; exit 2 ;;
esac
