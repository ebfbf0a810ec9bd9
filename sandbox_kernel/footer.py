"""The one-line footer after a cell: ``exit 0 · 12 ms · egress: default-deny · 2 blocked``.

Shown as the last stdout line of a cell, or as the last line of its error's traceback
(``c.SandboxKernel.footer``: always, on failure, never); the exit status is in the reply's
``metadata["sandbox"]`` either way.
"""

from __future__ import annotations

FOOTER_MODES = ("always", "on-failure", "never")


def format_duration(ms: float) -> str:
    """``12 ms``, ``3.2 s``, ``2 min 5 s`` — the footer's duration."""
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s"


def format_bytes(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def policy_label(policy) -> str:
    """How the footer names the policy in force: ``default-deny``, ``allowlist (3 entries)``."""
    if policy is None:
        return "default-deny"
    describe = getattr(policy, "describe", None)
    if callable(describe):
        return str(describe())
    return "default-deny"


def footer_line(exit_status: int, duration_ms: float, policy, blocked: int = 0) -> str:
    parts = [f"exit {exit_status}", format_duration(duration_ms), f"egress: {policy_label(policy)}"]
    if blocked:
        parts.append(f"{blocked} blocked")
    return " · ".join(parts)


def footer_for(mode: str, exit_status: int, duration_ms: float, policy, blocked: int = 0) -> str | None:
    """The footer a cell shows under ``mode`` (one of :data:`FOOTER_MODES`), or None."""
    if mode == "always" or (mode == "on-failure" and exit_status != 0):
        return footer_line(exit_status, duration_ms, policy, blocked)
    return None
