#!/usr/bin/env bash
# Set up everything the Sandbox kernel needs on a Debian 12 machine, as root:
# system tools (iproute2, nftables, bubblewrap, slirp4netns), a virtualenv in .venv with
# the package and its extras ($1, e.g. "lab" or "test"), and the `sandbox` kernelspec.
# Idempotent: a second run only checks. Sourced by lab.sh and test.sh.
set -euo pipefail

extras="${1:-lab}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SANDBOX_KERNEL_VENV:-$repo/.venv}"

if [ "$(id -u)" != 0 ]; then
  echo "setup: the local backend needs root (network namespaces, nftables); run as root" >&2
  exit 1
fi

need_apt=()
for pair in ip:iproute2 nft:nftables bwrap:bubblewrap slirp4netns:slirp4netns nsenter:util-linux \
            setpriv:util-linux unshare:util-linux ps:procps; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# the sandbox's seccomp filter is built with libseccomp
python3 -c 'import ctypes.util, sys; sys.exit(ctypes.util.find_library("seccomp") is None)' || need_apt+=(libseccomp2)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
# pip only when pyproject.toml changed or these extras are new since the last run (the install
# is editable: code changes need nothing), so a second run only checks and needs no network
stamp="$venv/.sandbox-kernel-setup"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1) $extras"
# the test extras include the lab extras (jupyterlab, nbclient): the suite runs lab.sh after test.sh
covered="${want% *} test"
if [ ! -x "$venv/bin/sandbox-kernel" ] || ! { grep -qxF "$want" "$stamp" || { [ "$extras" = lab ] && grep -qxF "$covered" "$stamp"; }; } 2>/dev/null; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$repo[$extras]"
  { grep -F "${want%% *} " "$stamp" 2>/dev/null || true; echo "$want"; } > "$stamp.new" && mv "$stamp.new" "$stamp"
fi

# The browser test (tests/browser) and the hub tests (tests/hub) when the extras include "test":
# Chromium from Debian (/usr/bin/chromium; playwright never downloads a browser), an emoji font
# for the notices, JupyterLab, and from npm at the versions package-lock.json pins:
# playwright-core and configurable-http-proxy.
case ",$extras," in
  *,test,*)
    need_apt=()
    [ -x /usr/bin/chromium ] || need_apt+=(chromium)
    [ -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need_apt+=(fonts-noto-color-emoji)
    command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
    if [ "${#need_apt[@]}" -gt 0 ]; then
      echo "setup: installing ${need_apt[*]} (browser test)"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    fi
    "$venv/bin/python" -c 'import jupyterlab' 2>/dev/null || "$venv/bin/python" -m pip install -q -e "$repo[lab]"
    # npm ci unless every package of the lockfile is installed at its locked version
    if ! (cd "$repo" && node -e '
        const fs = require("fs");
        for (const [path, pkg] of Object.entries(require("./package-lock.json").packages)) {
          if (!path || !pkg.version) continue;
          const file = path + "/package.json";
          if (!fs.existsSync(file) || JSON.parse(fs.readFileSync(file)).version !== pkg.version) process.exit(1);
        }
      ') >/dev/null 2>&1; then
      (cd "$repo" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    fi
    ;;
esac
"$venv/bin/sandbox-kernel" install --sys-prefix >/dev/null
"$venv/bin/sandbox-kernel" doctor
export PATH="$venv/bin:$PATH"
