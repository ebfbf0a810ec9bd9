"""The egress policy: model, administrator's ceiling, and pure compilers to each enforcer.

The model is re-exported here; the ceiling is :mod:`.admin`, the compilers are reached
through :func:`sandbox_kernel.policy.enforcers.render`. See docs/policy.md.
"""

from .model import (
    EgressPolicy,
    Entry,
    EntryNotFound,
    InvalidEntry,
    InvalidPolicy,
    PolicyFileError,
    UnknownPreset,
    UnsupportedByEnforcer,
    load_policy_file,
    parse_entry,
)

__all__ = [
    "EgressPolicy",
    "Entry",
    "EntryNotFound",
    "InvalidEntry",
    "InvalidPolicy",
    "PolicyFileError",
    "UnknownPreset",
    "UnsupportedByEnforcer",
    "load_policy_file",
    "parse_entry",
]
