#!/usr/bin/env bash
# Set up, then start JupyterLab with the Sandbox kernel on the local backend.
#   bash scripts/lab.sh                       JupyterLab on http://127.0.0.1:8888
#   bash scripts/lab.sh NOTEBOOK.ipynb…       run notebooks on the Sandbox kernel, print them with
#                                             their outputs; exit 1 if one has error output it does
#                                             not say it expects (sandbox_kernel/notebookrun.py)
# Run as root; Jupyter and its kernels do not run as root. This script (root) sets up the machine,
# a system user (sandbox-lab) and that user's virtualenv, then starts JupyterLab (or the notebook
# runner) as that user, with no capabilities and no_new_privs: the kernels run in rootless mode
# (c.LocalBackend.rootless), creating each sandbox's namespaces as that user.
# Both modes are the tutorials' demo: the demo host (sandbox-kernel demo-host, started by this
# script as root) runs while this command does, and the ceiling lets users allow it — for this
# command only (environment variables of this process; a deployment's configuration and defaults
# are unchanged).
# SANDBOX_LAB_IP / SANDBOX_LAB_PORT: where JupyterLab listens; SANDBOX_LAB_OUTPUT_DIR: where the
# executed notebooks are saved (default: a new temporary directory); SANDBOX_LAB_USER (sandbox-lab),
# SANDBOX_LAB_HOME (/var/lib/sandbox-lab: its working directory, JupyterLab's notebooks),
# SANDBOX_LAB_PREFIX (/opt/sandbox-lab: its virtualenv and tun device, owned by root).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup.sh
source "$repo/scripts/setup.sh" lab
cd "$repo"

demo_addr=10.231.254.2
say() { echo "lab.sh: $*" >&2; }

# -- the unprivileged user Jupyter runs as ------------------------------------------------------
lab_user="${SANDBOX_LAB_USER:-sandbox-lab}"
lab_home="${SANDBOX_LAB_HOME:-/var/lib/sandbox-lab}"
lab_prefix="${SANDBOX_LAB_PREFIX:-/opt/sandbox-lab}"
lab_venv="$lab_prefix/venv"
if ! id -u "$lab_user" >/dev/null 2>&1; then
  say "creating the system user $lab_user (home $lab_home): Jupyter runs as this user, not as root"
  useradd --system --user-group --home-dir "$lab_home" --shell /usr/sbin/nologin "$lab_user"
fi
if [ "$(id -u "$lab_user")" = 0 ]; then
  say "SANDBOX_LAB_USER=$lab_user is root: Jupyter must not run as root"
  exit 1
fi
install -d -o "$lab_user" -g "$lab_user" -m 0750 "$lab_home"
# root-owned: the lab user runs this virtualenv and may open the tun node, but changes neither
install -d -o root -g root -m 0755 "$lab_prefix"

# as_lab CMD…: run CMD as the lab user, with no capability (none inheritable, an empty bounding
# set), no_new_privs (no setuid program gives root back), a clean environment with the
# SANDBOX_KERNEL_* settings of this command, in the lab user's home
as_lab() {
  local -a pass=()
  local name
  for name in $(compgen -e); do
    case "$name" in SANDBOX_KERNEL_*) pass+=("$name=${!name}") ;; esac
  done
  setpriv --reuid="$lab_user" --regid="$lab_user" --init-groups --no-new-privs \
    --inh-caps=-all --bounding-set=-all \
    env -i -C "$lab_home" HOME="$lab_home" USER="$lab_user" LOGNAME="$lab_user" SHELL=/bin/bash \
      PATH="$lab_venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" LANG=C.UTF-8 TERM="${TERM:-dumb}" \
      XDG_RUNTIME_DIR="$lab_home/.run" JUPYTER_RUNTIME_DIR="$lab_home/.run/jupyter" \
      "${pass[@]}" SANDBOX_KERNEL_ROOTLESS=true "$@"
}
as_lab mkdir -p -m 0700 "$lab_home/.run"

# its own virtualenv, from the system's Python (the one in .venv may live where the lab user
# cannot read, e.g. under /root), with this checkout installed (not editable: the lab user need
# not read the checkout); reinstalled when the package's files change
exec 9>"$lab_prefix/.lock"
flock 9  # one set-up at a time (two lab.sh starting at once)
if [ ! -x "$lab_venv/bin/python" ]; then
  say "creating $lab_venv for $lab_user"
  /usr/bin/python3 -m venv "$lab_venv"
fi
lab_stamp="$lab_venv/.sandbox-kernel-lab"
lab_want="$(cd "$repo" && find pyproject.toml README.md sandbox_kernel kernelspec -type f ! -name '*.pyc' -print0 \
  | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1) $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$lab_stamp" 2>/dev/null)" != "$lab_want" ]; then
  if [ "$(cut -d' ' -f2 "$lab_stamp" 2>/dev/null)" = "${lab_want#* }" ]; then
    "$lab_venv/bin/python" -m pip install -q --no-deps --force-reinstall "$repo"  # only our code changed
  else
    "$lab_venv/bin/python" -m pip install -q --upgrade pip
    "$lab_venv/bin/python" -m pip install -q "$repo[lab]"
  fi
  "$lab_venv/bin/sandbox-kernel" install --sys-prefix >/dev/null
  echo "$lab_want" > "$lab_stamp"
fi

# slirp4netns (the sandbox's way out, for allowlists) needs a tun device the lab user may open:
# /dev/net/tun where it is 0666, else a node of the lab user's own in the root-owned prefix
if [ "$(stat -c %a /dev/net/tun 2>/dev/null)" != 666 ] && [ -c /dev/net/tun ]; then
  tun="$lab_prefix/tun"
  if [ "$(stat -c '%F %t:%T %U' "$tun" 2>/dev/null)" != "character special file a:c8 $lab_user" ]; then
    rm -f "$tun"
    mknod -m 0600 "$tun" c 10 200
    chown "$lab_user:" "$tun"
  fi
  export SANDBOX_KERNEL_TUN_DEVICE="$tun"
fi
flock -u 9
exec 9>&-
as_lab sandbox-kernel doctor >&2 || { say "the kernel cannot run as $lab_user (above: what is missing)"; exit 1; }

held=""
release_demo_host() {
  trap '' INT TERM  # a second Ctrl-C must not interrupt the clean-up
  if [ -n "$held" ]; then
    held=""
    sandbox-kernel demo-host release $$ >&2 || say "could not stop the demo host: sandbox-kernel demo-host stop"
  fi
}
trap release_demo_host EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

held=yes
sandbox-kernel demo-host hold $$ >&2
cluster_ranges_before="${SANDBOX_KERNEL_POLICY_CLUSTER_RANGES+set}"
# the demo ceiling (sandbox_kernel/demohost.py: demo_ceiling): users may also allow the demo
# host, and built-in cluster ranges that cover it leave it out
ceiling="$(python -m sandbox_kernel.demohost ceiling)"
eval "$ceiling"
say "demo ceiling (this command only): users may allow ${SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW}"
if [ -n "${SANDBOX_KERNEL_POLICY_CLUSTER_RANGES+set}" ] && [ -z "$cluster_ranges_before" ]; then
  say "  and the built-in cluster ranges leave out $demo_addr"
fi
say "  (a real deployment's default is 'public': set c.AdminPolicy.user_may_allow in sandbox_kernel_config.py;"
say "   a value set there wins over this one)"

if [ $# -gt 0 ] && [ -f "$1" ]; then
  out="${SANDBOX_LAB_OUTPUT_DIR:-$(mktemp -d)}"
  mkdir -p "$out"
  # the runner (as the lab user) reads copies of the notebooks in a directory root owns and
  # writes the executed ones to a directory of its own; they are read back as the lab user
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"; release_demo_host' EXIT
  chmod 0755 "$stage"
  install -d -o "$lab_user" -g "$lab_user" -m 0700 "$stage/out"
  names=()
  for path in "$@"; do
    name="$(basename "$path")"
    install -m 0644 "$path" "$stage/$name"
    names+=("$stage/$name")
  done
  status=0
  as_lab python -m sandbox_kernel.notebookrun --output-dir "$stage/out" "${names[@]}" || status=$?
  for path in "${names[@]}"; do
    name="$(basename "$path")"
    as_lab cat "$stage/out/$name" > "$out/$name" 2>/dev/null || rm -f "$out/$name"
  done
  say "executed notebooks saved in $out"
  exit "$status"
fi
# JupyterLab's directory: the tutorials, copied into the lab user's home the first time (they are
# its to edit; a copy it already has is kept)
as_lab mkdir -p "$lab_home/notebooks"
for path in "$repo"/notebooks/*.ipynb; do
  as_lab sh -c 'test -e "$1" || cat > "$1"' sh "$lab_home/notebooks/$(basename "$path")" < "$path"
done
say "JupyterLab with the Sandbox kernel, as $lab_user (rootless kernels) in $lab_home/notebooks;"
say "  Ctrl-C stops it and the demo host"
# not exec: the trap stops the demo host when JupyterLab ends
as_lab jupyter lab --no-browser --ip="${SANDBOX_LAB_IP:-127.0.0.1}" \
  --port="${SANDBOX_LAB_PORT:-8888}" --ServerApp.root_dir="$lab_home/notebooks" \
  --MultiKernelManager.default_kernel_name=sandbox "$@"
