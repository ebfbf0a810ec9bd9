#!/usr/bin/env bash
# The sandbox service's image for the test cluster (the Helm chart's hub.image), with no
# registry and no Docker, as scripts/cluster-images.sh builds the sandbox image:
#
#   bash scripts/cluster-hub-image.sh [build|name|status]
#
#   build    Debian bookworm (debootstrap --variant=minbase) + python3, user hub (uid/gid 1000),
#            and this checkout's sandbox-kernel[kubernetes,hub] with its dependencies (from PyPI)
#            in /usr/local/lib/python3.11/dist-packages; packed by scripts/cluster/rootfs_image.py
#            as an OCI image archive at $CACHE/images/hub.tar named $HUB_IMAGE. When the cluster
#            runs, the image is imported into its containerd at once (else `scripts/cluster.sh up`
#            imports every $CACHE/images/*.tar).
#   name     print the image's name (what tests set hub.image to)
#   status   whether it is built and current
#
# Two caches: the base (debootstrap + dependencies, $CACHE/hub-base) is rebuilt when
# pyproject.toml or this script's base step changes; the image is repacked when a file of the
# sandbox_kernel package changes (the code is copied over the base). A separate script from
# cluster-images.sh, whose own hash covers its whole text: a change here does not rebuild the
# sandbox image. CACHE is $SANDBOX_KERNEL_CLUSTER_CACHE, default /var/cache/sandbox-kernel/cluster.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SANDBOX_KERNEL_CLUSTER_CACHE:-/var/cache/sandbox-kernel/cluster}"
HUB_IMAGE="${SANDBOX_KERNEL_CLUSTER_HUB_IMAGE:-sandbox-kernel.local/hub:cluster}"
SUITE="bookworm"
CONTAINERD_SOCK=/run/sandbox-kernel-cluster/containerd.sock  # scripts/cluster.sh's

log() { echo "cluster-hub-image: $*" >&2; }

# The Debian mirror apt on this machine uses (as cluster-images.sh finds it).
debian_mirror() {
  local uri
  uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  [ -n "$uri" ] || uri="$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

# The hub image in two steps, each cached: a base (debootstrap + python3 + the project's
# dependencies from PyPI), rebuilt when the dependency list changes; then the base with this
# checkout's sandbox_kernel package copied over, repacked when the package's files change.
# pip runs on the build host: its Python is 3.11 like Debian bookworm's, so the wheels fit.
HUB_PACKAGES="python3"
HUB_SITE="usr/local/lib/python3.11/dist-packages"  # on Debian python3's sys.path

hub_base_hash() {
  { sed -n '/^hub_base_hash/,/^}/p;/^build_hub_base/,/^}/p' "$repo/scripts/cluster-hub-image.sh"
    cat "$repo/pyproject.toml"; echo "$SUITE $HUB_PACKAGES"; } | sha256sum | cut -c1-16
}

hub_inputs_hash() {
  { hub_base_hash; cat "$repo/scripts/cluster/rootfs_image.py"; echo "$HUB_IMAGE"
    sed -n '/^build_hub()/,/^}/p' "$repo/scripts/cluster-hub-image.sh"
    (cd "$repo" && find sandbox_kernel -name __pycache__ -prune -o -type f -print | LC_ALL=C sort | xargs sha256sum)
  } | sha256sum | cut -c1-16
}

hub_current() {
  [ -f "$CACHE/images/hub.tar" ] && [ -f "$CACHE/images/hub.stamp" ] \
    && [ "$(sed -n 1p "$CACHE/images/hub.stamp")" = "$(hub_inputs_hash)" ]
}

build_hub_base() {
  local base="$CACHE/hub-base" hash
  hash="$(hub_base_hash)"
  if [ -d "$base/rootfs" ] && [ "$(cat "$base/stamp" 2>/dev/null)" = "$hash" ]; then
    return 0
  fi
  command -v debootstrap >/dev/null || { log "installing debootstrap"; apt-get update -qq; apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
  local started mirror python
  started=$(date +%s)
  python="${HUB_BUILD_PYTHON:-$(command -v python3)}"
  "$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { log "the hub image's pip install needs a Python 3.11 on the build host (Debian $SUITE's); set HUB_BUILD_PYTHON"; return 1; }
  rm -rf "$base" && mkdir -p "$base" "$CACHE/debootstrap-debs-hub"
  mirror="$(debian_mirror)"
  log "hub base: debootstrap $SUITE (minbase + $HUB_PACKAGES) from $mirror"
  # a cache of its own: a concurrent sandbox build may be filling the other one
  debootstrap --variant=minbase --include="$HUB_PACKAGES" --cache-dir="$CACHE/debootstrap-debs-hub" \
    "$SUITE" "$base/rootfs" "$mirror" >"$base/debootstrap.log" 2>&1 \
    || { tail -20 "$base/debootstrap.log" >&2; log "debootstrap failed"; rm -rf "$base/rootfs"; return 1; }
  chroot "$base/rootfs" groupadd --gid 1000 hub
  chroot "$base/rootfs" useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin hub
  log "hub base: pip install sandbox-kernel[kubernetes,hub] and its dependencies"
  "$python" -m pip install --quiet --no-cache-dir --disable-pip-version-check --no-compile \
    --target "$base/rootfs/$HUB_SITE" "$repo[kubernetes,hub]" >"$base/pip.log" 2>&1 \
    || { tail -20 "$base/pip.log" >&2; log "pip install failed"; rm -rf "$base/rootfs"; return 1; }
  rm -rf "$base/rootfs/$HUB_SITE/bin" "$base/rootfs/$HUB_SITE/share"  # scripts and data files: not used
  rm -rf "$base"/rootfs/var/cache/apt/* "$base"/rootfs/var/lib/apt/lists/* "$base"/rootfs/usr/share/doc/* \
    "$base"/rootfs/usr/share/man/* "$base"/rootfs/usr/share/info/* "$base"/rootfs/usr/share/locale/* \
    "$base"/rootfs/var/log/* "$base"/rootfs/tmp/* "$base"/rootfs/var/tmp/* "$base"/rootfs/root/.cache
  : >"$base/rootfs/etc/resolv.conf"
  : >"$base/rootfs/etc/machine-id"
  echo "$hash" >"$base/stamp"
  log "hub base built in $(( $(date +%s) - started )) s"
}

build_hub() {
  [ "$(id -u)" = 0 ] || { log "building the hub image needs root (debootstrap)"; return 1; }
  if ! hub_current; then
    build_hub_base
    local started root
    started=$(date +%s)
    mkdir -p "$CACHE/images" "$CACHE/tmp"
    work="$(mktemp -d "$CACHE/tmp/hub.XXXXXX")"  # global: the EXIT trap reads it
    trap 'rm -rf "$work"' EXIT
    root="$work/rootfs"
    cp -a "$CACHE/hub-base/rootfs" "$root"
    # this checkout's package over the one pip installed (only the code changes between builds)
    rm -rf "$root/$HUB_SITE/sandbox_kernel"
    (cd "$repo" && tar --exclude=__pycache__ -cf - sandbox_kernel) | tar -C "$root/$HUB_SITE" -xf -
    chroot "$root" python3 -c 'import sandbox_kernel.hub.service, kubernetes, jupyterhub.services.auth; print("hub image: sandbox_kernel", sandbox_kernel.__version__, "kubernetes", kubernetes.__version__, "jupyterhub", jupyterhub.__version__)' >&2
    python3 "$repo/scripts/cluster/rootfs_image.py" "$root" "$CACHE/images/hub.tar" --name "$HUB_IMAGE" \
      --user 1000:1000 --workdir /tmp \
      --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env HOME=/tmp --env PYTHONUNBUFFERED=1 --env PYTHONDONTWRITEBYTECODE=1 --env LANG=C.UTF-8 \
      --cmd python3 -m sandbox_kernel.hub >"$work/pack.json"
    { hub_inputs_hash; echo "$HUB_IMAGE"; cat "$work/pack.json"; } >"$CACHE/images/hub.stamp"
    rm -rf "$work"
    trap - EXIT
    log "hub image $HUB_IMAGE: $(du -h "$CACHE/images/hub.tar" | cut -f1) archive, packed in $(( $(date +%s) - started )) s"
  else
    log "$HUB_IMAGE is current ($CACHE/images/hub.tar)"
  fi
  # a running cluster gets it now (`scripts/cluster.sh up` imports every archive anyway)
  local sock="$CONTAINERD_SOCK"
  if [ -S "$sock" ] && command -v ctr >/dev/null && ctr --address "$sock" version >/dev/null 2>&1; then
    local digest
    digest="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' \
      <(tar -xOf "$CACHE/images/hub.tar" index.json))"
    if ! ctr --address "$sock" -n k8s.io images ls -q "name==$HUB_IMAGE" 2>/dev/null | grep -q . \
       || [ "$(ctr --address "$sock" -n k8s.io images ls "name==$HUB_IMAGE" | awk 'NR==2 {print $3}')" != "$digest" ]; then
      log "importing $HUB_IMAGE into the cluster's containerd"
      ctr --address "$sock" -n k8s.io images import --all-platforms "$CACHE/images/hub.tar" >&2
    fi
  fi
}

status() {
  if hub_current; then echo "hub image: $HUB_IMAGE current ($(du -h "$CACHE/images/hub.tar" | cut -f1))"
  else echo "hub image: $HUB_IMAGE not built or stale"; fi
}

case "${1:-build}" in
  build) build_hub ;;
  name) echo "$HUB_IMAGE" ;;
  status) status ;;
  *) echo "usage: $0 [build|name|status]" >&2; exit 2 ;;
esac
