#!/usr/bin/env bash
# Set up, then start JupyterLab with the Sandbox kernel on the local backend.
#   bash scripts/lab.sh                       JupyterLab on http://127.0.0.1:8888
#   bash scripts/lab.sh NOTEBOOK.ipynb…       run notebooks on the Sandbox kernel, print them with
#                                             their outputs; exit 1 if one has error output it does
#                                             not say it expects (sandbox_kernel/notebookrun.py)
# Both modes are the tutorials' demo: the demo host (sandbox-kernel demo-host) runs while this
# command does, and the ceiling lets users allow it — for this command only (environment
# variables of this process; a deployment's configuration and defaults are unchanged).
# SANDBOX_LAB_IP / SANDBOX_LAB_PORT: where JupyterLab listens; SANDBOX_LAB_OUTPUT_DIR: where the
# executed notebooks are saved (default: a new temporary directory).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup.sh
source "$repo/scripts/setup.sh" lab
cd "$repo"

demo_addr=10.231.254.2
say() { echo "lab.sh: $*" >&2; }

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
  status=0
  python -m sandbox_kernel.notebookrun --output-dir "$out" "$@" || status=$?
  say "executed notebooks saved in $out"
  exit "$status"
fi
say "JupyterLab with the Sandbox kernel; Ctrl-C stops it and the demo host"
# not exec: the trap stops the demo host when JupyterLab ends
jupyter lab --allow-root --no-browser --ip="${SANDBOX_LAB_IP:-127.0.0.1}" \
  --port="${SANDBOX_LAB_PORT:-8888}" --ServerApp.root_dir="$repo/notebooks" \
  --MultiKernelManager.default_kernel_name=sandbox "$@"
