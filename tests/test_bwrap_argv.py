"""The agent's bubblewrap command, built by the pure builder (backends/local/bwrap.py): no
root, no namespaces, nothing read from the host."""

from __future__ import annotations

import pytest

from sandbox_kernel.backends.local.bwrap import BwrapSpec, bwrap_argv
from sandbox_kernel.backends.local.layout import AGENT_PATH, SANDBOX_HOME

LINKS = (("/bin", "usr/bin"), ("/lib", "usr/lib"), ("/lib64", None))


def spec(**kw) -> BwrapSpec:
    base = dict(root="/run/sk/ab12cd34", python="/opt/venv/bin/python3",
                binds=("/opt/venv", "/tmp/ci/venv", "/usr/lib/python3.12", "/data/shared"),
                root_links=LINKS, tmp_size=256 << 20, uid=65534, seccomp_fd=7)
    base.update(kw)
    return BwrapSpec(**base)


def root_spec(**kw) -> BwrapSpec:
    return spec(userns_fd=5, netns_path="/run/netns/sbx-ab12cd34", **kw)


def rootless_spec(**kw) -> BwrapSpec:
    return spec(rootless_enter=("nsenter", "--target=4242", "--user", "--net", "--preserve-credentials"), **kw)


def pairs(argv: list[str], option: str) -> list[tuple[str, str]]:
    """The two arguments after each occurrence of ``option``."""
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == option]


def test_root_mode_enters_the_netns_then_the_user_namespace_and_drops_to_the_uid():
    argv = bwrap_argv(root_spec())
    assert argv[:5] == ["nsenter", "--net=/run/netns/sbx-ab12cd34", "nsenter", "--user=/proc/self/fd/5", "bwrap"]
    tail = argv[argv.index("--seccomp"):]
    assert tail == ["--seccomp", "7", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "/opt/venv/bin/python3", "-s", AGENT_PATH]
    caps = [argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"]
    assert caps == ["CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"]  # for setpriv, which then drops all
    assert "--unshare-user" not in argv and "prlimit" not in argv


def test_rootless_mode_makes_a_further_user_namespace_under_rlimits_and_keeps_no_capability():
    argv = bwrap_argv(rootless_spec(rlimits=("--nproc=512", "--data=2147483648")))
    assert argv[:11] == ["nsenter", "--target=4242", "--user", "--net", "--preserve-credentials",
                         "prlimit", "--nproc=512", "--data=2147483648",
                         "bwrap", "--unshare-user", "--uid"]
    assert argv[11:15] == ["65534", "--gid", "65534", "--disable-userns"]
    assert argv[argv.index("--cap-drop"):] == ["--cap-drop", "ALL", "--seccomp", "7",
                                               "/opt/venv/bin/python3", "-s", AGENT_PATH]
    assert "--cap-add" not in argv and "setpriv" not in argv and "nsenter" not in argv[5:]
    # without rlimits, no prlimit
    assert "prlimit" not in bwrap_argv(rootless_spec())


def test_root_mode_without_its_namespaces_is_refused():
    with pytest.raises(ValueError):
        bwrap_argv(spec())


@pytest.mark.parametrize("make", [root_spec, rootless_spec])
def test_filesystem_view(make):
    argv = bwrap_argv(make())
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent", "--new-session",
                 "--clearenv"):
        assert flag in argv
    ro = pairs(argv, "--ro-bind")
    assert ro[0] == ("/usr", "/usr")
    assert ("/etc", "/etc") in ro and ("/run/sk/ab12cd34/resolv.conf", "/etc/resolv.conf") in ro
    assert ro.index(("/etc", "/etc")) < ro.index(("/run/sk/ab12cd34/resolv.conf", "/etc/resolv.conf"))
    # the host's top-level links as the host has them: symlinks stay symlinks, a directory is bound
    assert pairs(argv, "--symlink") == [("usr/bin", "/bin"), ("usr/lib", "/lib")]
    assert ("/lib64", "/lib64") in ro
    # binds in order; /usr/… ones are covered by /usr; /tmp/… after the private /tmp
    binds = [src for src, dst in ro if src == dst and src not in ("/usr", "/etc", "/lib64")]
    assert binds == ["/opt/venv", "/tmp/ci/venv", "/data/shared"]
    assert argv.index("--tmpfs") < argv.index("/tmp/ci/venv")
    assert argv[argv.index("--tmpfs") - 4:argv.index("--tmpfs") + 2] == [
        "--perms", "1777", "--size", str(256 << 20), "--tmpfs", "/tmp"]
    # parents of the binds made once each, world-readable; /tmp is the tmpfs, never a --dir
    dirs = [argv[i + 1] for i, a in enumerate(argv) if a == "--dir"]
    assert dirs == ["/opt", "/tmp/ci", "/data", "/home", "/opt/sandbox-agent"]
    assert all(argv[i - 2:i] == ["--perms", "0755"] for i, a in enumerate(argv) if a == "--dir")
    # the working directory is the one writable bind, the agent read-only, the root read-only
    assert pairs(argv, "--bind") == [("/run/sk/ab12cd34/work", SANDBOX_HOME)]
    assert ("/run/sk/ab12cd34/agent.pyz", AGENT_PATH) in ro
    assert argv[argv.index("--remount-ro") + 1] == "/"
    assert argv[argv.index("--chdir") + 1] == SANDBOX_HOME
    env = dict(pairs(argv, "--setenv"))
    assert env == {"HOME": SANDBOX_HOME, "USER": "sandbox", "PATH": "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin",
                   "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "TERM": "xterm-256color"}


def test_pure_same_spec_same_argv():
    assert bwrap_argv(root_spec()) == bwrap_argv(root_spec())
    assert bwrap_argv(root_spec(uid=1000)) != bwrap_argv(root_spec())
