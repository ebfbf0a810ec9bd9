"""The kernel application: ``python -m sandbox_kernel -f {connection_file}``.

Configuration is read from ``sandbox_kernel_config.py`` in the Jupyter config path,
e.g. ``c.SandboxKernel.footer = "on-failure"`` or ``c.LocalBackend.uid = 65534``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

from ipykernel.kernelapp import IPKernelApp
from traitlets import Type

from .backends.local import LocalBackend
from .config import load_config
from .kernel import SandboxKernel
from .policy.admin import AdminPolicy


class ParentWatch(threading.Thread):
    """Ends the kernel when the process that started it (Jupyter Server, a notebook runner)
    is gone — as ipykernel's parent poller does — but stops the sandbox first.

    ipykernel's poller calls ``os._exit`` at once, which left the sandbox behind: its netns
    until ``sandbox-kernel gc``, or, in hub mode, a sandbox the service kept running. That
    happened whenever a server died without shutting its kernels down, e.g. a JupyterHub
    user server stopped with SIGINT."""

    def __init__(self, app: IPKernelApp, parent_pid: int, interval: float = 1.0, stop_timeout: float = 20.0):
        super().__init__(name="sandbox-parent-watch", daemon=True)
        self.app, self.parent_pid = app, parent_pid
        self.interval, self.stop_timeout = interval, stop_timeout

    def run(self) -> None:
        if os.getppid() != self.parent_pid:
            return  # already reparented before we looked: nothing reliable to watch
        while os.getppid() == self.parent_pid:
            time.sleep(self.interval)
        self.app.log.warning("the process that started this kernel exited: stopping the sandbox, then the kernel")
        kernel = getattr(self.app, "kernel", None)
        try:
            future = asyncio.run_coroutine_threadsafe(kernel.sandbox.stop(), kernel.io_loop.asyncio_loop)
            future.result(self.stop_timeout)
        except Exception as err:  # noqa: BLE001 - exiting regardless; gc removes leftovers
            self.app.log.warning("stopping the sandbox failed: %s", err)
        os._exit(1)


class SandboxKernelApp(IPKernelApp):
    name = "sandbox-kernel"
    description = "The Sandbox Jupyter kernel: cells run in an isolated sandbox."
    kernel_class = Type(SandboxKernel, klass="ipykernel.kernelbase.Kernel")

    classes = [*IPKernelApp.classes, SandboxKernel, LocalBackend, AdminPolicy]

    def initialize(self, argv=None):
        """Also read ``sandbox_kernel_config.py`` from the Jupyter config path
        (``jupyter --paths``: e.g. /etc/jupyter, ~/.jupyter), not only from IPython's."""
        load_config(self)
        super().initialize(argv)

    def init_poller(self):
        """Watch the parent (see :class:`ParentWatch`) instead of ipykernel's poller."""
        if sys.platform != "win32" and self.parent_handle and self.parent_handle != 1:
            self.poller = ParentWatch(self, self.parent_handle)
        else:
            super().init_poller()


def main() -> None:
    if any(arg.startswith("--help") for arg in sys.argv[1:]):
        # only for the help: importing the kubernetes client takes seconds at every start
        try:
            from .backends.kubernetes import KubernetesBackend
        except ImportError:  # the kubernetes extra is not installed
            pass
        else:
            SandboxKernelApp.classes = [*SandboxKernelApp.classes, KubernetesBackend]
    SandboxKernelApp.launch_instance()
