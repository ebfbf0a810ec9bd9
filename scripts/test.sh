#!/usr/bin/env bash
# Set up, then run the whole test suite. Exits non-zero when a test fails or none ran.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup.sh
source "$repo/scripts/setup.sh" test
cd "$repo"
# leftovers of an earlier, killed run would only confuse the cleanup tests
sandbox-kernel gc >/dev/null
status=0
python -m pytest -p no:cacheprovider "$@" || status=$?
if [ "$status" = 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
fi
exit "$status"
