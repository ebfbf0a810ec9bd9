"""How every setting of the project falls back to its environment variable.

Each traitlets setting names, in its help, the environment variable that overrides its
default (``SANDBOX_KERNEL_…``); the trait's ``@default`` method reads it through these
helpers, so an empty variable means "not set" everywhere and a malformed one is the same
typed error everywhere. A value in a config file still wins over the environment.
"""

from __future__ import annotations

import os
import re
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


CONFIG_FILE = "sandbox_kernel_config"


def load_config(app=None):
    """Load ``sandbox_kernel_config.py`` from every Jupyter config directory
    (``jupyter --paths``: e.g. /etc/jupyter, then ~/.jupyter; the most specific wins).

    The kernel application, ``sandbox-kernel gc`` and ``sandbox-kernel doctor`` all read
    their settings through this one function, so a value set in a config file (say
    ``c.LocalBackend.state_dir``) means the same thing to each of them. Given a traitlets
    ``Application``, loads into it; otherwise into a fresh one. Returns its ``Config``."""
    from jupyter_core.paths import jupyter_config_path
    from traitlets.config.application import Application

    target = app if app is not None else Application()
    for directory in reversed(jupyter_config_path()):
        # traitlets' own loader (IPython's override of it takes no path)
        Application.load_config_file(target, CONFIG_FILE, path=[directory])
    return target.config


def parse_duration(text: str | float) -> float:
    """``"1h"``, ``"30m"``, ``"90s"``, ``"2d"``, ``"86400"`` → seconds. ValueError otherwise."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 3600, 90s, 30m, 1h, 2d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
