"""The notebooks in notebooks/ run top to bottom on the Sandbox kernel (nbclient) and show
what they say they show; ``sandbox-kernel demo-host`` creates and removes its destination.

Notebooks 2 and 3 talk to the demo host (10.231.254.2); here a ``test_host`` takes its place:
its address goes into the ``parameters`` cell and into the ``%sandbox`` lines, which the
kernel reads literally. A cell tagged ``raises-exception`` must fail, every other cell must
succeed (nbclient raises otherwise).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NOTICE = "application/vnd.sandbox-kernel.notice+json"
WIDGET = "application/vnd.jupyter.widget-view+json"
DEMO_ADDR = "10.231.254.2"


class Run:
    """An executed notebook: its cells, and the execute_reply of each code cell."""

    def __init__(self, nb, replies: dict[int, dict]):
        self.nb = nb
        self.replies = replies

    def cell(self, text: str) -> tuple[int, dict]:
        """The first code cell whose source contains ``text``."""
        for i, cell in enumerate(self.nb.cells):
            if cell.cell_type == "code" and text in cell.source:
                return i, cell
        raise KeyError(text)

    def cells(self, text: str) -> list[tuple[int, dict]]:
        return [(i, c) for i, c in enumerate(self.nb.cells) if c.cell_type == "code" and text in c.source]

    def notices(self, index: int) -> list[dict]:
        return [o["data"][NOTICE] for o in self.nb.cells[index].outputs
                if o.get("output_type") == "display_data" and NOTICE in o.get("data", {})]

    def sandbox_meta(self, index: int) -> dict:
        return self.replies[index]["metadata"]["sandbox"]


def footer(cell) -> str:
    """The cell's footer line (the last stream line, or the last line of its error)."""
    lines = []
    for out in cell.outputs:
        if out.get("output_type") == "stream":
            lines += out["text"].splitlines()
        elif out.get("output_type") == "error":
            lines += out["traceback"]
    found = [line for line in lines if re.match(r"^exit -?\d+ · ", line)]
    assert found, f"no footer in {cell.source!r}: {lines}"
    return found[-1]


def text_of(cell) -> str:
    parts = []
    for out in cell.outputs:
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif out.get("output_type") in ("display_data", "execute_result"):
            parts.append(out["data"].get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append("\n".join(out["traceback"]))
    return "".join(p if p.endswith("\n") else p + "\n" for p in parts)


#: the environment of a notebook that opens public names and the test host: the user may allow
#: both; the presets name real hosts, which resolve against nothing (the discard port on
#: loopback), so no lookup leaves the machine and their addresses stay unopened
MAY_ALLOW_PUBLIC = {"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "public 10.231.0.0/16",
                    "SANDBOX_KERNEL_UPSTREAM_DNS": "127.0.0.1:9"}


def execute(name: str, env: dict | None = None, host: str | None = None) -> Run:
    """Run ``notebooks/<name>`` on the Sandbox kernel; point it at ``host`` if given."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    if host is not None:
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
        params[0].source = f"DEMO_HOST = {host!r}\nDEMO_PORT = 8080"
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.source = cell.source.replace(DEMO_ADDR, host)
    replies: dict[int, dict] = {}
    client = NotebookClient(nb, kernel_name="sandbox", timeout=60, resources={"metadata": {"path": "/tmp"}},
                            on_cell_executed=lambda cell, cell_index, execute_reply: replies.__setitem__(cell_index, execute_reply))
    client.execute(env={**os.environ, **(env or {})})
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        failed = any(o.get("output_type") == "error" for o in cell.outputs)
        expected = "raises-exception" in cell.metadata.get("tags", [])
        assert failed == expected, f"cell {i} {'failed' if failed else 'succeeded'} unexpectedly: {cell.source!r}"
        assert replies[i]["metadata"]["sandbox"]["exit_status"] == int(footer(cell).split()[1]), cell.source
    return Run(nb, replies)


def test_committed_notebooks_are_clean():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "sandbox", path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"stale output in {path.name}: {cell.source!r}"


def test_getting_started():
    run = execute("01-getting-started.ipynb")
    i, cell = run.cell("step {i}")
    assert text_of(cell).startswith("step 0\nstep 1\nstep 2\n")
    assert footer(cell).startswith("exit 0 · ") and footer(cell).endswith("egress: default-deny")
    assert footer(run.cell("exit 3")[1]).startswith("exit 3 · ")
    assert footer(run.cell("SystemExit(2)")[1]).startswith("exit 2 · ")
    assert "/home/sandbox/project" in text_of(run.cell("os.getcwd()")[1])
    assert "uid 65534" in text_of(run.cell("os.getuid()")[1])
    i, cell = run.cell("10.0.2.2")
    assert "refused:" in text_of(cell)
    assert [n["port"] for n in run.notices(i)] == [8888]
    assert footer(cell).endswith("1 blocked")
    assert "b'pong'" in text_of(run.cell("pong")[1])


def test_egress_policies(test_host):
    host = test_host(8080)
    run = execute("02-egress-policies.ipynb", host=host.ip, env=MAY_ALLOW_PUBLIC)
    entry = f"{host.ip}:8080/tcp"

    i, status = run.cell("%sandbox status")
    assert re.search(r"^policy +default-deny$", text_of(status), re.M)

    blocked, reached, again = (i for i, _ in run.cells("hello(DEMO_HOST)"))
    [notice] = run.notices(blocked)
    assert (notice["ip"], notice["port"], notice["protocol"]) == (host.ip, 8080, "tcp")
    assert notice["verdict"] == "guarded" and notice["policy"]["mode"] == "deny"
    assert notice["remedy"] == {"action": "allow", "command": f"%sandbox allow {entry}", "entry": entry}
    assert run.sandbox_meta(blocked)["blocked"][0]["remedy"] == notice["remedy"]
    assert footer(run.nb.cells[blocked]).startswith("exit 1 · ") and footer(run.nb.cells[blocked]).endswith("1 blocked")

    i, allow = run.cell(f"%sandbox allow {entry}")
    assert f"egress now: allowlist (1 entry): {entry}" in text_of(allow)
    assert "hello from test host" in text_of(run.nb.cells[reached])
    assert run.sandbox_meta(reached)["exit_status"] == 0 and run.sandbox_meta(reached)["blocked"] == []

    i, other_port = run.cell("hello(DEMO_HOST, 8081)")
    assert "refused:" in text_of(other_port) and [n["port"] for n in run.notices(i)] == [8081]

    assert "presets: pypi" in text_of(run.cell("%sandbox preset pypi")[1])
    status_after = text_of(run.cells("%sandbox status")[-1][1])
    assert re.search(r"^presets +pypi$", status_after, re.M) and entry in status_after

    i, panel = run.cell("%sandbox policy")
    [shown] = [o for o in panel.outputs if o.get("output_type") == "display_data"]
    assert WIDGET in shown["data"] and "Sandbox egress policy: allowlist" in shown["data"]["text/plain"]
    states = run.nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(s["model_name"] == "ButtonModel" and s["state"].get("description") == "Apply" for s in states.values())

    assert "egress now: allowlist (0 entries, presets: pypi)" in text_of(run.cell("%sandbox revoke")[1])
    [notice] = run.notices(again)
    assert notice["policy"]["mode"] == "allowlist" and notice["port"] == 8080

    listed = text_of(run.cell("%sandbox blocked")[1])
    assert f"{host.ip}:8080" in listed and f"{host.ip}:8081" in listed

    i, curl = run.cell("!curl")
    [notice] = run.notices(i)
    assert notice["verdict"] == "rejected" and notice["ip"] == host.ip
    assert footer(curl).startswith("exit 7 · ")

    assert "egress now: default-deny" in text_of(run.cell("%sandbox mode deny")[1])
    assert host.seen() == 1  # only the allowed connection ever reached the host


def test_exam_mode(test_host):
    host = test_host(8080)
    run = execute("03-exam-mode.ipynb", host=host.ip, env={"SANDBOX_KERNEL_POLICY_LOCKED": "true"})
    assert "locked by your administrator (exam mode)" in text_of(run.cell("%sandbox status")[1])

    i, _ = run.cell("def hello")
    [notice] = run.notices(i)
    assert notice["verdict"] == "guarded"
    assert notice["remedy"]["action"] == "forbidden" and "exam mode" in notice["remedy"]["reason"]

    for magic in (f"%sandbox allow {host.ip}:8080/tcp", "%sandbox preset pypi"):
        i, cell = run.cell(magic)
        [error] = [o for o in cell.outputs if o["output_type"] == "error"]
        assert error["ename"] == "CeilingRefused"
        assert error["traceback"][0].startswith("CeilingRefused: Refused by your administrator's rule: "
                                                "the administrator has locked the egress policy (exam mode).")
        assert footer(cell).startswith("exit 1 · ") and footer(cell).endswith("egress: default-deny")

    states = run.nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any("locked by your administrator" in str(s["state"].get("value", "")) for s in states.values())
    assert all(s["state"].get("disabled") for s in states.values() if s["state"].get("description") in ("Apply", "Allow"))

    i, _ = run.cell("guard.enabled = False")
    [notice] = run.notices(i)
    assert notice["verdict"] == "rejected"  # from the enforcer's log: the guard was off
    assert re.search(r"^policy +default-deny$", text_of(run.cells("%sandbox status")[-1][1]), re.M)
    assert host.seen() == 0


def test_for_administrators(tmp_path):
    run = execute("04-for-administrators.ipynb")
    i, _ = run.cell("169.254.169.254")
    [notice] = run.notices(i)
    assert notice["remedy"]["action"] == "forbidden" and "always blocked" in notice["remedy"]["reason"]
    i, cell = run.cell("%sandbox allow 169.254.169.254")
    assert "CeilingRefused" in text_of(cell)


def _blocks(cell, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", cell.source, re.S)


def test_administrators_notebook_shows_what_the_cli_prints(tmp_path):
    """The YAML and doctor lines in notebook 4 are static text: they must match the tools."""
    nb = nbformat.read(NOTEBOOKS / "04-for-administrators.ipynb", as_version=4)
    by_tag = {t: c for c in nb.cells for t in c.metadata.get("tags", [])}
    (tmp_path / "course.yaml").write_text(_blocks(by_tag["policy-file"], "yaml")[0])
    (tmp_path / "resolved.json").write_text(_blocks(by_tag["policy-file"], "json")[0])
    cli = [sys.executable, "-m", "sandbox_kernel.cli"]
    check = subprocess.run([*cli, "policy", "check", "course.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() in by_tag["policy-file"].source.replace("\n", " ")
    rendered = subprocess.run(
        [*cli, "policy", "render", "--enforcer", "networkpolicy", "--namespace", "jupyter-alice",
         "--resolved", "resolved.json", "course.yaml"], cwd=tmp_path, capture_output=True, text=True, check=True)
    shown = _blocks(by_tag["rendered-networkpolicy"], "yaml")[0]
    assert list(yaml.safe_load_all(shown)) == list(yaml.safe_load_all(rendered.stdout))
    doctor = subprocess.run([*cli, "doctor"], capture_output=True, text=True)
    if doctor.returncode == 0:
        for label in ("local backend: ready", "sandbox interpreter:", "state directory:", "sandbox uid:", "uplink (allowlist):"):
            assert label in doctor.stdout and label in by_tag["doctor"].source


# -- sandbox-kernel demo-host ---------------------------------------------------------------

def _demo_host(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["sandbox-kernel", "demo-host", *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def demo_host():
    """Leaves no demo host behind. Skips if one is running already (it is someone's)."""
    if _demo_host("status").returncode == 0:
        pytest.skip("a demo host is already running on this machine; not touching it")
    yield _demo_host
    _demo_host("stop")


def _greeting(request: bytes = b"") -> bytes:
    with socket.create_connection((DEMO_ADDR, 8080), timeout=5) as conn:
        conn.settimeout(5)
        if request:
            conn.sendall(request)
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        return data


def test_demo_host_start_status_stop(demo_host):
    started = demo_host("start")
    assert started.returncode == 0, started.stderr
    assert f"running at {DEMO_ADDR}:8080" in started.stdout
    assert demo_host("start").returncode == 0  # idempotent
    assert demo_host("status").returncode == 0
    assert _greeting() == b"hello from the demo host\n"
    http = _greeting(b"GET / HTTP/1.0\r\nHost: demo\r\n\r\n")
    assert http.startswith(b"HTTP/1.0 200 OK\r\n") and http.endswith(b"\r\n\r\nhello from the demo host\n")
    assert "skdemo" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout

    stopped = demo_host("stop")
    assert stopped.returncode == 0 and "removed" in stopped.stdout
    assert demo_host("status").returncode == 1
    assert "skdemo" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", "skdemo-h"], capture_output=True).returncode != 0
    assert demo_host("stop").returncode == 0  # idempotent


def test_demo_host_is_reachable_from_a_sandbox_only_when_allowed(demo_host, fresh_kernel):
    assert demo_host("start").returncode == 0
    kernel = fresh_kernel({"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": f"public {DEMO_ADDR}"})
    code = ("import socket\n"
            f"print(socket.create_connection(({DEMO_ADDR!r}, 8080), timeout=5).recv(100).decode())")
    assert kernel.execute(code).status == "error"
    assert kernel.execute(f"%sandbox allow {DEMO_ADDR}:8080").status == "ok"
    assert kernel.execute(code).stream().startswith("hello from the demo host\n")


def test_demo_host_hold_release(demo_host):
    """Two commands hold the demo host: it stops when the last one releases it; a demo host
    started by hand outlives its holders."""
    first = subprocess.Popen(["sleep", "300"])
    second = subprocess.Popen(["sleep", "300"])
    try:
        held = demo_host("hold", first.pid)
        assert held.returncode == 0, held.stderr
        assert "stopped when this command ends" in held.stdout
        assert "shared with 1 other command(s)" in demo_host("hold", second.pid).stdout
        assert "left running for 1 other command(s)" in demo_host("release", first.pid).stdout
        assert demo_host("status").returncode == 0
        # a holder that died without releasing is not waited for
        second.kill()
        second.wait()
        assert "removed network namespace skdemo" in demo_host("release", 999_999_999).stdout
        assert demo_host("status").returncode == 1

        assert demo_host("start").returncode == 0  # by hand: persistent
        assert "started by hand" in demo_host("hold", first.pid).stdout
        assert "left running" in demo_host("release", first.pid).stdout
        assert demo_host("status").returncode == 0
        assert demo_host("hold", 0).returncode == 2 and demo_host("release", "x").returncode == 2
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


# -- scripts/lab.sh: the README's command --------------------------------------------------

LAB = ROOT / "scripts" / "lab.sh"


def _demo_host_running() -> bool:
    return _demo_host("status").returncode == 0


def test_every_notebook_runs_through_lab_sh_with_only_the_errors_it_expects(tmp_path):
    """``bash scripts/lab.sh NOTEBOOK…``, the real script (set-up, demo host, demo ceiling): every
    notebook under notebooks/ shows error output only where it says it expects it."""
    from sandbox_kernel.notebookrun import check

    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    running_before = _demo_host_running()
    out = tmp_path / "executed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_KERNEL_POLICY_")}
    result = subprocess.run(["bash", str(LAB), *map(str, notebooks)], capture_output=True, text=True,
                            timeout=900, env={**env, "SANDBOX_LAB_OUTPUT_DIR": str(out)}, cwd=tmp_path)
    assert "notebook problem" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    # it said what it runs with
    assert "demo ceiling (this command only): users may allow public 10.231.254.2" in result.stderr
    assert "demo host: running at 10.231.254.2:8080" in result.stderr
    # the notebooks ran as the unprivileged lab user, whose kernels are rootless
    assert "mode:                rootless" in result.stderr
    assert "03-exam-mode.ipynb: run in exam mode (locked), as its metadata asks" in result.stderr
    assert f"ok: {len(notebooks)} notebook(s) ran" in result.stderr
    # the tutorials work: the central cell of the egress notebook reached the demo host
    assert "'hello from the demo host'" in result.stdout
    assert "10.231.254.2:8080/tcp is outside what your administrator" not in result.stdout
    for path in notebooks:
        nb = nbformat.read(out / path.name, as_version=4)
        assert check(nb, path.name) == []
        assert sum(1 for c in nb.cells if c.cell_type == "code" and c.outputs) >= 3, path.name
    egress = nbformat.read(out / "02-egress-policies.ipynb", as_version=4)
    allow = next(c for c in egress.cells if c.source.startswith("%sandbox allow"))
    assert "egress now: allowlist (1 entry): 10.231.254.2:8080/tcp" in text_of(allow)
    exam = nbformat.read(out / "03-exam-mode.ipynb", as_version=4)
    refused = next(c for c in exam.cells if c.source.startswith("%sandbox allow"))
    assert [o["ename"] for o in refused.outputs if o.get("output_type") == "error"] == ["CeilingRefused"]
    # the demo host ends with the command (unless it ran before it: then it is someone's)
    assert _demo_host_running() == running_before


def test_a_notebook_with_unexpected_errors_fails_lab_sh(tmp_path):
    """The check has teeth: an error where the notebook expects none, and a tagged cell that
    does not fail, make lab.sh exit 1 and say which cells."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "sandbox", "display_name": "Sandbox", "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("%sandbox allow 10.0.2.2:8888/tcp"),
                nbformat.v4.new_code_cell("1 + 1", metadata={"tags": ["raises-exception"]}),
                nbformat.v4.new_code_cell("import sys; print('oops', file=sys.stderr)"),
                nbformat.v4.new_code_cell("1/0", metadata={"tags": ["raises-exception"],
                                                           "sandbox_kernel": {"expected_error": "ZeroDivisionError"}})]
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    result = subprocess.run(["bash", str(LAB), str(path)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "SANDBOX_LAB_OUTPUT_DIR": str(tmp_path / "out")})
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if line.startswith("notebook problem: ")]
    assert len(problems) == 3, result.stderr
    assert "cell 0" in problems[0] and "unexpected error CeilingRefused" in problems[0]
    assert "cell 1" in problems[1] and "ended without an error" in problems[1]
    assert "cell 2" in problems[2] and "unexpected output on stderr: 'oops'" in problems[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_execute(port: int, token: str, codes: list[str]) -> list[str]:
    """Start a kernel through JupyterLab's REST API (its default: sandbox), run ``codes`` over the
    kernel websocket as JupyterLab does, return each cell's text output; the kernel is deleted."""
    import asyncio
    import json
    import urllib.request
    import uuid

    from tornado.websocket import websocket_connect

    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"token {token}"}
    request = urllib.request.Request(f"{base}/api/kernels", data=b"{}", headers=headers, method="POST")
    kernel_id = json.loads(urllib.request.urlopen(request, timeout=60).read())["id"]

    async def run() -> list[str]:
        ws = await websocket_connect(f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?token={token}")
        session, texts = uuid.uuid4().hex, []
        for code in codes:
            msg_id = uuid.uuid4().hex
            await ws.write_message(json.dumps({
                "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                           "session": session, "date": "", "version": "5.3"},
                "parent_header": {}, "metadata": {}, "channel": "shell",
                "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                            "allow_stdin": False, "stop_on_error": True}}))
            text = ""
            while True:
                msg = json.loads(await asyncio.wait_for(ws.read_message(), 120))
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    text += msg["content"]["text"]
                elif msg["msg_type"] in ("execute_result", "display_data"):
                    text += msg["content"]["data"].get("text/plain", "") + "\n"
                elif msg["msg_type"] == "error":
                    text += "\n".join(msg["content"]["traceback"]) + "\n"
                elif msg["msg_type"] == "execute_reply":
                    break
            texts.append(text)
        ws.close()
        return texts

    try:
        return asyncio.run(run())
    finally:
        delete = urllib.request.Request(f"{base}/api/kernels/{kernel_id}", headers=headers, method="DELETE")
        urllib.request.urlopen(delete, timeout=60).read()


def _lab_uid() -> int | None:
    import pwd

    try:
        return pwd.getpwnam("sandbox-lab").pw_uid
    except KeyError:
        return None


def _session_processes(sid: int, name: bytes) -> dict[int, str]:
    """pid -> /proc status of the processes of session ``sid`` whose command line has ``name``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) != sid:
                continue
            if name in (entry / "cmdline").read_bytes():
                found[int(entry.name)] = (entry / "status").read_text()
        except OSError:
            continue
    return found


def test_lab_sh_jupyterlab_mode_runs_the_demo_and_stops_it_on_ctrl_c(tmp_path):
    """``bash scripts/lab.sh``: JupyterLab's kernels get the demo ceiling and reach the demo host;
    Ctrl-C ends JupyterLab and the demo host."""
    import re
    import signal

    running_before = _demo_host_running()
    port = _free_port()
    proc = subprocess.Popen(["bash", str(LAB)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "SANDBOX_LAB_PORT": str(port), "JUPYTER_RUNTIME_DIR": str(tmp_path)})
    try:
        said = []
        for line in proc.stdout:
            said.append(line)
            if re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=\w+", line):
                break
        text = "".join(said)
        assert "demo ceiling (this command only)" in text and "Ctrl-C stops it and the demo host" in text, text
        assert _demo_host_running()
        # JupyterLab runs as the lab user, with no capability and no_new_privs: its kernels and
        # terminals can never be root (the demo host, started by lab.sh as root, is not in it)
        lab_uid = _lab_uid()
        assert lab_uid not in (None, 0)
        server = _session_processes(proc.pid, b"jupyter-lab")
        assert server, "no JupyterLab process in lab.sh's session"
        for status in server.values():
            assert f"Uid:\t{lab_uid}\t{lab_uid}\t{lab_uid}\t{lab_uid}" in status, status
            assert "NoNewPrivs:\t1" in status and "CapBnd:\t0000000000000000" in status
        assert "mode:                rootless" in text, text
        token = re.search(r"token=(\w+)", said[-1]).group(1)
        allow, hello = _lab_execute(port, token, [
            f"%sandbox allow {DEMO_ADDR}:8080/tcp",
            f"import socket\nprint(socket.create_connection(({DEMO_ADDR!r}, 8080), timeout=5).recv(100).decode())"])
        assert f"egress now: allowlist (1 entry): {DEMO_ADDR}:8080/tcp" in allow, allow
        assert "hello from the demo host" in hello, hello
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    if not running_before:
        assert "demo host: removed network namespace skdemo" in rest, rest
    assert _demo_host_running() == running_before


def test_demo_ceiling_permits_the_demo_host_and_nothing_else(monkeypatch):
    """lab.sh's ceiling (demohost.demo_ceiling): the demo host is added to what users may allow;
    built-in cluster ranges that cover it (private ranges, if the defaults have them) leave out
    that one address; a variable the administrator set is kept as it is."""
    import ipaddress

    from sandbox_kernel import demohost
    from sandbox_kernel.policy import admin

    assert demohost.demo_ceiling({})["SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW"] == f"public {DEMO_ADDR}"
    assert demohost.demo_ceiling({"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "pypi.org"})[
        "SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW"] == f"pypi.org {DEMO_ADDR}"
    monkeypatch.setattr(admin, "DEFAULT_CLUSTER_RANGES", {"10.0.0.0/8": "private", "fc00::/7": "ula"}, raising=False)
    env = demohost.demo_ceiling({})
    ranges = [ipaddress.ip_network(t) for t in env["SANDBOX_KERNEL_POLICY_CLUSTER_RANGES"].split()]
    demo = ipaddress.ip_address(DEMO_ADDR)
    assert not any(demo in net for net in ranges)
    v4 = [n for n in ranges if n.version == 4]
    assert sum(n.num_addresses for n in v4) == 2**24 - 1  # all of 10/8 but the demo host
    assert ipaddress.ip_network("fc00::/7") in ranges
    assert "SANDBOX_KERNEL_POLICY_CLUSTER_RANGES" not in demohost.demo_ceiling(
        {"SANDBOX_KERNEL_POLICY_CLUSTER_RANGES": "10.0.0.0/8"})
    assert admin.AdminPolicy(cluster_ranges=env["SANDBOX_KERNEL_POLICY_CLUSTER_RANGES"].split()).blocked_reason(DEMO_ADDR) is None


def test_learn_a_notebooks_policy(test_host):
    host = test_host(8080)
    run = execute("05-learn-a-notebooks-policy.ipynb", host=host.ip, env=MAY_ALLOW_PUBLIC)
    entry = f"{host.ip}:8080/tcp"
    work = [run.cell("no course data:")[0], run.cell('echo "subprocess: no course data"')[0], run.cell("no cloud metadata")[0]]
    assert [[n["verdict"] for n in run.notices(i)] for i in work] == [["guarded"], ["rejected"], ["guarded"]]
    assert "3 destinations so far" not in text_of(run.cell("%sandbox learn status")[1])  # two hosts, three tries
    assert "2 destinations so far" in text_of(run.cell("%sandbox learn status")[1])

    i, stop = run.cell("%sandbox learn stop")
    [proposal] = [o["data"]["application/vnd.sandbox-kernel.learn+json"] for o in stop.outputs
                  if "application/vnd.sandbox-kernel.learn+json" in o.get("data", {})]
    assert [(p["text"], p["verdict"]) for p in proposal["items"]] == [
        (entry, "you may allow"), ("169.254.169.254:80/tcp", "beyond your administrator's limits")]
    assert [t["count"] for t in proposal["tried"]][0] == 2  # Python and curl, one entry
    assert any(WIDGET in o.get("data", {}) for o in stop.outputs)

    i, _ = run.cell("%sandbox learn insert")
    [payload] = run.replies[i]["content"]["payload"]
    shown = next(c.source for c in run.nb.cells if c.cell_type == "markdown" and "```\n%sandbox allow" in c.source)
    assert payload == {"source": "set_next_input", "replace": False,
                       "text": shown.split("```\n")[1].replace(DEMO_ADDR, host.ip).removesuffix("```")}

    assert f"egress now: allowlist (1 entry): {entry}" in text_of(run.cell("%sandbox learn apply")[1])
    i, after = run.cell("now allowed")
    assert "course data, now allowed: hello from test host" in text_of(after) and run.sandbox_meta(i)["blocked"] == []
    assert host.seen() == 2  # only the two fetches after apply reached the host
