#!/usr/bin/env bash
# Set up, then run the whole test suite. Exits non-zero when a test fails or none ran.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup.sh
source "$repo/scripts/setup.sh" test
cd "$repo"
# leftovers of an earlier, killed run would only confuse the cleanup tests
sandbox-kernel gc >/dev/null
# The Kubernetes tests run on a real one-node cluster built here (scripts/cluster.sh) whenever
# this machine can (root, Go); without Go they are skipped with the reason. Under CI=true a
# cluster that cannot start is a failure. SANDBOX_KERNEL_TEST_CLUSTER=0 turns them off.
if [ -x /usr/local/go/bin/go ] && ! command -v go >/dev/null; then
  export PATH="$PATH:/usr/local/go/bin"
fi
export SANDBOX_KERNEL_TEST_CLUSTER="${SANDBOX_KERNEL_TEST_CLUSTER:-auto}"
# The rootless tests run a kernel as uid 65534 from this checkout, so every directory above it
# must be traversable by others (search only, not listing); a clone made in a private directory
# (`mktemp -d` is 0700) is not, and those kernels would die at start.
d="$repo"
while [ "$d" != / ]; do
  d="$(dirname "$d")"
  if [ -n "$(find "$d" -maxdepth 0 ! -perm -o+x)" ]; then
    echo "test.sh: chmod o+x $d (the rootless tests' kernel, uid 65534, must reach this checkout)" >&2
    chmod o+x "$d"
  fi
done
status=0
python -m pytest -p no:cacheprovider "$@" || status=$?
if [ "$status" = 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
fi
exit "$status"
