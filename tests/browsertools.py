"""What the browser tests share (tests/browser, tests/hub): are headless Chromium, node and
playwright-core there, running one of the node scripts that drive the browser, and stopping
what it started.

Each script gets one JSON argument and prints its report as one JSON object on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def browser_missing(*, jupyterlab: bool = False) -> list[str]:
    """What a browser test needs and this machine lacks (empty: nothing); ``jupyterlab`` when
    the test serves JupyterLab itself."""
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if not shutil.which("node"):
        missing.append("node (apt-get install nodejs)")
    if not (ROOT / "node_modules" / "playwright-core" / "package.json").exists():
        missing.append("playwright-core (npm ci at the repository root)")
    if jupyterlab:
        try:
            import jupyterlab  # noqa: F401
        except ImportError:
            missing.append("jupyterlab (pip install jupyterlab)")
    return missing


def pids_using(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (a directory only this test made)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return pids


def kill_tree(proc: subprocess.Popen | None, marker: str | None = None) -> None:
    """Stop ``proc`` (leader of its own session) and whatever still names ``marker``."""
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    if marker:
        for pid in pids_using(marker):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def write_notebook(path: Path, *sources: str) -> None:
    """A notebook of code cells with these sources, for the Sandbox kernel."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "sandbox", "display_name": "Sandbox", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nb, path)


def script_config(tmp_path: Path, **own) -> dict:
    """A browser script's argument: its Chromium (a fresh profile in ``tmp_path``), where a
    failure's screenshot goes, how long a step may wait; then the script's own fields."""
    return {
        "userDataDir": str(tmp_path / "chromium-profile"), "failureDir": str(tmp_path),
        "executablePath": CHROMIUM,
        "timeoutMs": int(os.environ.get("SANDBOX_KERNEL_BROWSER_TIMEOUT_MS", "45000")),
        **own,
    }


def run_browser_script(script: Path, config: dict, timeout: float = 300) -> tuple[dict, str]:
    """Run ``node script config`` (see :func:`script_config`); then stop whatever it left
    running and remove its Chromium profile (``userDataDir``, when the config names one: the
    hub's scripts make and remove their own). Returns the script's report (its last JSON line
    on stdout) and its stderr."""
    profile = Path(config["userDataDir"]) if config.get("userDataDir") else None
    node = subprocess.Popen(["node", str(script), json.dumps(config)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, err = node.communicate(timeout=timeout)
    finally:
        kill_tree(node, marker=str(profile) if profile else None)
        if profile:
            shutil.rmtree(profile, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"{script.name} printed no report (exit {node.returncode}):\n{out}\n{err[-4000:]}"
    return json.loads(lines[-1]), err


def report_context(report: dict, err: str, log: Path) -> str:
    """What an assertion on a script's report shows: the report, the script's stderr, the
    end of the server's log."""
    return (f"\nreport: {json.dumps(report, indent=1, ensure_ascii=False)}\nstderr: {err[-2000:]}"
            f"\nlab log:\n{log.read_text()[-3000:]}")


def shots_dir(tmp_path: Path) -> Path:
    """Where screenshots go: ``$SANDBOX_KERNEL_SCREENSHOTS`` (relative: to the repository) when
    set, else a directory in ``tmp_path``; made if needed."""
    shots = Path(os.environ.get("SANDBOX_KERNEL_SCREENSHOTS") or tmp_path / "screenshots")
    if not shots.is_absolute():
        shots = ROOT / shots
    shots.mkdir(parents=True, exist_ok=True)
    return shots
