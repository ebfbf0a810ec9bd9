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

#: the modules that run inside the sandbox (stdlib only)
AGENT_MODULES = ("__init__.py", "__main__.py", "protocol.py", "channel.py", "runner.py", "netwatch.py", "guard.py")

_MAIN = b"import runpy\nrunpy.run_module('sandbox_agent', run_name='__main__', alter_sys=True)\n"


@functools.lru_cache(maxsize=1)
def build_pyz() -> bytes:
    """Return the agent zipapp. Deterministic: the same sources give the same bytes."""
    here = Path(__file__).parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in AGENT_MODULES:
            path = here / name
            if path.exists():
                info = zipfile.ZipInfo(f"sandbox_agent/{name}", date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())
        info = zipfile.ZipInfo("__main__.py", date_time=(2020, 1, 1, 0, 0, 0))
        zf.writestr(info, _MAIN)
    return buf.getvalue()


def pyz_digest() -> str:
    """Short content hash of the zipapp (names the file, labels ConfigMaps)."""
    return hashlib.sha256(build_pyz()).hexdigest()[:12]
