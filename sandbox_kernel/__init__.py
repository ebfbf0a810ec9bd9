"""Sandbox Kernel: a Jupyter kernel whose cells run in a network-isolated sandbox."""

__version__ = "0.1.0"
