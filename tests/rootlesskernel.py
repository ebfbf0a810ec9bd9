"""The Sandbox kernel in rootless mode, started as an unprivileged user, for the tests.

:class:`RootlessKernels` makes a kernelspec, ``sandbox-rootless``, whose kernel runs as uid 65534
with no capability and ``no_new_privs`` (``setpriv``), in rootless mode
(``SANDBOX_KERNEL_ROOTLESS=true``): it creates each sandbox's user and network namespaces itself,
as lab.sh's Jupyter user does. Test modules marked ``both_modes`` run each kernel test against
a root kernel and against this one (conftest.py: the ``kernel_mode`` parameter).

What the unprivileged kernel needs, made here and removed by :meth:`RootlessKernels.close`:

- a home it owns (runtime and state directories under it);
- an interpreter it may run: a virtualenv of the system's Python (the test run's own may live
  where uid 65534 cannot read, e.g. under /root) that sees this checkout and the test run's
  packages through a ``.pth`` file; the sandbox binds those read-only (a config file), so code in
  it imports what a root-mode sandbox imports;
- a tun device it may open, for slirp4netns (``/dev/net/tun`` is 0600 on many hosts): a node of
  its own (``c.LocalBackend.tun_device``);
- the connection file: jupyter_client (root) writes it where only root reads; the wrapper
  (this file's ``__main__``) copies it into the home, then becomes uid 65534 and runs the kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"
UID = 65534
KERNEL_NAME = "sandbox-rootless"


def unavailable() -> str | None:
    """Why a rootless kernel cannot be started as uid 65534 here, or None."""
    if os.geteuid() != 0:
        return "needs root (to start the unprivileged kernel as uid 65534)"
    if not os.path.exists(SYSTEM_PYTHON):
        return f"needs a system Python at {SYSTEM_PYTHON}"
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(tuple(sys.version_info[:2]))"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        return f"{SYSTEM_PYTHON} is Python {version}, not {sys.version_info[:2]}: it cannot load this run's packages"
    return None


class RootlessKernels:
    """A home for uid 65534 with the ``sandbox-rootless`` kernelspec (see the module's docstring)."""

    name = KERNEL_NAME

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="skt-rootless-"))
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        home = self.home
        venv = home / "venv"
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        ours = sysconfig.get_paths()["purelib"]
        (site / "sandbox_kernel_tests.pth").write_text(f"{ROOT}\n{ours}\n")
        config = home / "config"
        config.mkdir()
        # the sandbox sees the test run's packages (numpy…) as a root-mode sandbox does
        (config / "sandbox_kernel_config.py").write_text(
            f"c.LocalBackend.extra_ro_binds = [{ours!r}]\n")
        self.tun = home / "tun"
        subprocess.run(["mknod", str(self.tun), "c", "10", "200"], check=True)
        self.tun.chmod(0o600)
        for sub in ("xdg", "runtime", "conn"):
            (home / sub).mkdir(mode=0o700)
        spec = home / "share" / "jupyter" / "kernels" / KERNEL_NAME
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, str(Path(__file__).resolve()), str(home), "{connection_file}"],
            "display_name": "Sandbox (rootless, uid 65534)", "language": "python", "interrupt_mode": "message",
        }))
        for path in [home, *home.rglob("*")]:
            if not path.is_symlink():
                os.chown(path, UID, UID)
        home.chmod(0o700)

    @property
    def python(self) -> str:
        return str(self.home / "venv" / "bin" / "python")

    @property
    def jupyter_path(self) -> str:
        return str(self.home / "share" / "jupyter")

    @property
    def state_dir(self) -> Path:
        return self.home / "xdg" / "sandbox-kernel"

    def close(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


def kernel_env(home: Path, inherited: dict[str, str]) -> dict[str, str]:
    """The unprivileged kernel's environment: the SANDBOX_KERNEL_* settings the test gave it,
    and its own home, paths and rootless mode."""
    env = {k: v for k, v in inherited.items() if k.startswith("SANDBOX_KERNEL_")}
    env.update({
        "HOME": str(home), "USER": "nobody", "LANG": "C.UTF-8",
        "PATH": f"{home / 'venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "XDG_RUNTIME_DIR": str(home / "xdg"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "SANDBOX_KERNEL_ROOTLESS": "true", "SANDBOX_KERNEL_TUN_DEVICE": str(home / "tun"),
    })
    env.setdefault("SANDBOX_KERNEL_PYTHON", str(home / "venv" / "bin" / "python"))
    return env


def _main(home: str, connection_file: str) -> None:
    """As root (jupyter_client's child): hand the connection file over, become uid 65534 with no
    capability and no_new_privs, and run the kernel (exec: the same process, so jupyter_client's
    signals reach it)."""
    copy = Path(home) / "conn" / Path(connection_file).name
    copy.write_bytes(Path(connection_file).read_bytes())
    os.chown(copy, UID, UID)
    copy.chmod(0o600)
    env = kernel_env(Path(home), dict(os.environ))
    os.chdir(home)
    os.execve("/usr/bin/setpriv", [
        "setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--no-new-privs",
        "--inh-caps=-all", "--bounding-set=-all",
        env["PATH"].split(":")[0] + "/python", "-m", "sandbox_kernel", "-f", str(copy)], env)


if __name__ == "__main__":
    _main(*sys.argv[1:])
