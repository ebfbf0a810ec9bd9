"""How every setting of the project falls back to its environment variable.

Each traitlets setting names, in its help, the environment variable that overrides its
default (``SANDBOX_KERNEL_…``); the trait's ``@default`` method reads it through these
helpers, so an empty variable means "not set" everywhere and a malformed one is the same
typed error everywhere. A value in a config file still wins over the environment.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from traitlets import TraitError


def env_default(name: str, fallback: Any, parse: Callable[[str], Any] = str) -> Any:
    """``parse(os.environ[name])``, or ``fallback`` when the variable is unset or empty."""
    value = os.environ.get(name)
    return fallback if value in (None, "") else parse(value)


def env_bool(name: str, fallback: bool) -> bool:
    """A yes/no variable (1/true/yes/on, 0/false/no/off); anything else is a TraitError."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return fallback
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise TraitError(f"{name}={text!r} is not a boolean (use true or false)")
