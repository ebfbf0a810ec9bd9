#!/usr/bin/env bash
# Set up, then start JupyterLab with the Sandbox kernel on the local backend.
#   bash scripts/lab.sh                       JupyterLab on http://127.0.0.1:8888
#   bash scripts/lab.sh NOTEBOOK.ipynb        run a notebook on the Sandbox kernel, print its outputs
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup.sh
source "$repo/scripts/setup.sh" lab
cd "$repo"
if [ $# -gt 0 ] && [ -f "$1" ]; then
  out="$(mktemp -d)"
  jupyter nbconvert --to notebook --execute --ExecutePreprocessor.kernel_name=sandbox \
    --allow-errors --output-dir="$out" "$1"
  jupyter nbconvert --to markdown --stdout "$out/$(basename "$1")" 2>/dev/null
  exit 0
fi
exec jupyter lab --allow-root --no-browser --ip="${SANDBOX_LAB_IP:-127.0.0.1}" \
  --port="${SANDBOX_LAB_PORT:-8888}" --ServerApp.root_dir="$repo/notebooks" \
  --MultiKernelManager.default_kernel_name=sandbox "$@"
