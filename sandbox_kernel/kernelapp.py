"""The kernel application: ``python -m sandbox_kernel -f {connection_file}``.

Configuration is read from ``sandbox_kernel_config.py`` in the Jupyter config path,
e.g. ``c.SandboxKernel.footer = "on-failure"`` or ``c.LocalBackend.uid = 65534``.
"""

from __future__ import annotations

import sys

from ipykernel.kernelapp import IPKernelApp
from traitlets import Type

from .backends.local import LocalBackend
from .kernel import SandboxKernel
from .policy.admin import AdminPolicy


class SandboxKernelApp(IPKernelApp):
    name = "sandbox-kernel"
    description = "The Sandbox Jupyter kernel: cells run in an isolated sandbox."
    kernel_class = Type(SandboxKernel, klass="ipykernel.kernelbase.Kernel")

    classes = [*IPKernelApp.classes, SandboxKernel, LocalBackend, AdminPolicy]

    def initialize(self, argv=None):
        """Also read ``sandbox_kernel_config.py`` from the Jupyter config path
        (``jupyter --paths``: e.g. /etc/jupyter, ~/.jupyter), not only from IPython's."""
        from jupyter_core.paths import jupyter_config_path
        from traitlets.config.application import Application

        for directory in reversed(jupyter_config_path()):  # the most specific one wins
            # traitlets' own loader: IPython's override takes no path
            Application.load_config_file(self, "sandbox_kernel_config", path=[directory])
        super().initialize(argv)


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
