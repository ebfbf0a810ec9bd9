"""Package the agent as one zipapp (``agent.pyz``) that any python3 can run.

The same bytes go to every backend: bind-mounted into a local sandbox, shipped in a
ConfigMap to a pod. Inside the zip the package is called ``sandbox_agent`` so it never
collides with a ``sandbox_kernel`` the user may have installed in the sandbox image.
"""

from __future__ import annotations

import functools
import hashlib
import io
import zipfile
from pathlib import Path

#: modules of the agent package that run in the kernel, not in the sandbox: left out of the
#: zipapp. Every other module of the package goes in, so a new or renamed module can never
#: be silently missing from the sandbox.
KERNEL_SIDE = frozenset({"bundle.py"})

_MAIN = b"import runpy\nrunpy.run_module('sandbox_agent', run_name='__main__', alter_sys=True)\n"


def agent_modules(package_dir: Path) -> list[Path]:
    """The agent package's modules that run inside the sandbox, in a stable order."""
    return sorted(p for p in package_dir.glob("*.py") if p.name not in KERNEL_SIDE)


def pack(package_dir: Path) -> bytes:
    """Zip ``package_dir``'s sandbox-side modules as ``sandbox_agent`` plus a runnable ``__main__``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in agent_modules(package_dir):
            info = zipfile.ZipInfo(f"sandbox_agent/{path.name}", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
        info = zipfile.ZipInfo("__main__.py", date_time=(2020, 1, 1, 0, 0, 0))
        zf.writestr(info, _MAIN)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def build_pyz() -> bytes:
    """Return the agent zipapp. Deterministic: the same sources give the same bytes."""
    return pack(Path(__file__).parent)


def pyz_digest() -> str:
    """Short content hash of the zipapp (names the file, labels ConfigMaps)."""
    return hashlib.sha256(build_pyz()).hexdigest()[:12]
