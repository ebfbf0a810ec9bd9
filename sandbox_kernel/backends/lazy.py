"""Names of a backend package imported on first use (PEP 562), shared by both packages.

A package lists ``exports`` (public name -> the module of the package that defines it) and
``modules`` (its submodules reachable as attributes), then says
``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _MODULES)``. Nothing here imports
anything of the project, so a process that starts with the package stays fast.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str],
                 modules: frozenset[str] | set[str] = frozenset()) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name in modules:
            return importlib.import_module(f".{name}", package)
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports, *modules])

    return __getattr__, __dir__
