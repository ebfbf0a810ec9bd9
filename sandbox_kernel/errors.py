"""Errors a user or an administrator can hit.

Every error says what happened and what to do; the kernel shows ``str(err)`` in the
notebook, never a traceback from its own machinery.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class of every error this project raises on purpose."""

    #: short name shown as ``ename`` in the notebook
    ename = "SandboxError"


class IsolationUnavailable(SandboxError):
    """The machine cannot provide the isolation the backend needs (raised before any code runs)."""

    ename = "IsolationUnavailable"

    def __init__(self, missing: list[str]):
        self.missing = list(missing)
        lines = "\n".join(f"  - {m}" for m in self.missing)
        super().__init__(
            "The local sandbox cannot be created on this machine, so no code was run:\n"
            f"{lines}\n"
            "Run `sandbox-kernel doctor` for a full report."
        )


class SandboxStartError(SandboxError):
    """Starting a sandbox failed."""

    ename = "SandboxStartError"


class SandboxCrashed(SandboxError):
    """The sandbox process ended while a cell was running or waiting to run."""

    ename = "SandboxCrashed"


class ProtocolError(SandboxError):
    """The agent sent something that is not a valid protocol frame."""

    ename = "ProtocolError"


class PolicyError(SandboxError):
    """A policy could not be parsed, validated or applied; nothing was changed."""

    ename = "PolicyError"
