"""Shared fixtures: a real Sandbox kernel through jupyter_client, and test hosts.

Test hosts live in network namespaces these fixtures create (prefix ``skt-``) with
addresses in 10.231.0.0/16, and are always removed, even when a test fails. No test
sends traffic anywhere else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from kerneltest import (_HOST_INDEX, KernelDriver, TestHost, add_host_namespace, remove_host, reset_between_tests,
                        shared_kernel, start_host_server)
from localcluster import local_cluster, pytest_collection_finish, pytest_sessionfinish  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]

#: the test hosts' ranges (10.231.0.0/16 and fd00:231::/32 here, 10.213.0.0/16 for the
#: cluster suite's hosts): private, so inside the default cluster_ranges. The test ceiling's
#: cluster_ranges are the defaults minus these, so the tests can reach their own hosts and
#: nothing else private (a kernel's environment inherits this variable).
TEST_HOST_RANGES = ("10.231.0.0/16", "10.213.0.0/16", "fd00:231::/32")


def _test_cluster_ranges() -> str:
    import ipaddress

    from sandbox_kernel.policy.admin import DEFAULT_CLUSTER_RANGES

    holes = [ipaddress.ip_network(h) for h in TEST_HOST_RANGES]
    out = []
    for text in DEFAULT_CLUSTER_RANGES:
        parts = [ipaddress.ip_network(text)]
        for hole in holes:
            parts = [piece for part in parts
                     for piece in (part.address_exclude(hole) if hole.version == part.version and hole.subnet_of(part) else [part])]
        out += [str(n) for n in ipaddress.collapse_addresses(parts)]
    return " ".join(out)


os.environ.setdefault("SANDBOX_KERNEL_POLICY_CLUSTER_RANGES", _test_cluster_ranges())


def pytest_report_header(config):
    return [f"sandbox-kernel tests as uid {os.geteuid()}; netns/nft/bwrap: "
            f"{all(shutil.which(t) for t in ('ip', 'nft', 'bwrap', 'slirp4netns'))}"]


@pytest.fixture(scope="session", autouse=True)
def kernelspec_path(tmp_path_factory):
    """Install the ``sandbox`` kernelspec into a private JUPYTER_PATH for the test run."""
    from sandbox_kernel.cli import install

    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    install(prefix=str(prefix))
    data = prefix / "share" / "jupyter"
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(data), *([old] if old else [])])
    yield data
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.fixture(scope="session")
def rootless_kernels(kernelspec_path):
    """The ``sandbox-rootless`` kernelspec: a kernel in rootless mode running as uid 65534
    (tests/rootlesskernel.py); removed after the run."""
    import rootlesskernel

    reason = rootlesskernel.unavailable()
    if reason:
        pytest.skip(f"rootless mode: {reason}")
    made = rootlesskernel.RootlessKernels()
    os.environ["JUPYTER_PATH"] = os.pathsep.join([made.jupyter_path, os.environ["JUPYTER_PATH"]])
    yield made
    made.close()


@pytest.fixture(scope="module")
def kernel_mode():
    """How the kernel fixtures' kernels run: ``root`` (the default), or ``rootless`` (uid 65534,
    tests/rootlesskernel.py) in modules marked ``both_modes``, which run each test in both."""
    return "root"


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("both_modes") and "kernel_mode" in metafunc.fixturenames:
        metafunc.parametrize("kernel_mode", ["root", "rootless"], scope="module")


def _kernel_name(kernel_mode: str, request) -> str:
    return request.getfixturevalue("rootless_kernels").name if kernel_mode == "rootless" else "sandbox"


@pytest.fixture(scope="module")
def _module_kernel(kernel_mode, request):
    yield from shared_kernel(kernel_name=_kernel_name(kernel_mode, request))


@pytest.fixture
def kernel(_module_kernel):
    """A Sandbox kernel shared by a test module, reset before each test (see reset_between_tests)."""
    return reset_between_tests(_module_kernel)


@pytest.fixture
def fresh_kernel(kernel_mode, request):
    """A kernel of its own for a test that crashes, restarts or configures it."""
    drivers = []
    name = _kernel_name(kernel_mode, request)

    def start(env: dict | None = None) -> KernelDriver:
        driver = KernelDriver(env, name)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.shutdown()


@pytest.fixture
def test_host():
    """Create test hosts on demand; every namespace, veth and process is removed after."""
    made: list[tuple[str, subprocess.Popen | None]] = []

    def make(port: int = 8080) -> TestHost:
        # a new subnet for every host of the run, so no policy entry left by an earlier
        # test can match a later test's host
        index = (os.getpid() * 7 + next(_HOST_INDEX)) % 250 + 1
        name = f"skt-{uuid.uuid4().hex[:6]}"
        ip, gw = f"10.231.{index}.2", f"10.231.{index}.1"
        ip6, gw6 = f"fd00:231:{index:x}::2", f"fd00:231:{index:x}::1"
        made.append((name, None))
        add_host_namespace(name, ip, gw, ip6, gw6)
        made[-1] = (name, start_host_server(name, port))
        return TestHost(name=name, ip=ip, ip6=ip6, port=port)

    yield make
    for name, proc in made:
        remove_host(name, proc)
