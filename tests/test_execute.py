"""Cells through a real jupyter_client to the real kernel on the real local backend."""

import contextlib
import os
import re
import signal
import time

import pytest



def test_stream_arrives_while_the_cell_runs(kernel):
    cell = kernel.execute("import time\nfor i in range(4):\n    print(i)\n    time.sleep(0.4)")
    lines = [(t, o["content"]["text"]) for t, o in zip(cell.times, cell.outputs) if o["msg_type"] == "stream"]
    numbered = [(t, text) for t, text in lines if text.strip().isdigit()]
    assert [text.strip() for _, text in numbered] == ["0", "1", "2", "3"]
    # one by one: each line arrives about 0.4 s after the previous one, not all at the end
    gaps = [b[0] - a[0] for a, b in zip(numbered, numbered[1:])]
    assert all(0.25 < gap < 0.9 for gap in gaps), gaps


def test_shell_and_subprocess_output_streams(kernel):
    cell = kernel.execute("!for shvar in 1 2 3; do echo line$shvar; sleep 0.3; done")
    texts = [o["content"]["text"] for o in cell.of_type("stream")]
    assert "line1" in cell.stream() and "line3" in cell.stream()
    assert len([t for t in texts if t.startswith("line")]) >= 2, texts
    cell = kernel.execute("%%bash\necho from-bash\necho to-stderr >&2")
    assert "from-bash" in cell.stream("stdout")
    assert "to-stderr" in cell.stream("stderr")
    cell = kernel.execute("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'print(\"child says hi\")'])")
    assert "child says hi" in cell.stream()


@pytest.mark.parametrize(
    ("code", "exit_status", "status"),
    [
        ("x = 1", 0, "ok"),
        ("1/0", 1, "error"),
        ("raise SystemExit(3)", 3, "error"),
        ("raise SystemExit(0)", 0, "ok"),
        ("!false", 1, "error"),
        ("!true", 0, "ok"),
        ("%%bash\nexit 7", 7, "error"),
        ("!exit 2\n!exit 5", 5, "error"),
    ],
)
def test_exit_status_contract(kernel, code, exit_status, status):
    cell = kernel.execute(code)
    assert cell.status == status
    meta = cell.sandbox
    assert meta["exit_status"] == exit_status
    assert isinstance(meta["duration_ms"], float) and meta["duration_ms"] >= 0
    assert meta["blocked"] == []
    footer = f"exit {exit_status} · "
    if status == "error":
        errors = cell.of_type("error")
        assert len(errors) == 1
        assert errors[0]["content"]["traceback"][-1].startswith(footer)
        assert "egress: default-deny" in errors[0]["content"]["traceback"][-1]
    else:
        assert cell.stream().splitlines()[-1].startswith(footer)


def test_error_cell_has_exactly_one_output_with_readable_traceback(kernel):
    cell = kernel.execute("def f():\n    raise ValueError('bad value')\nf()")
    assert [o["msg_type"] for o in cell.outputs] == ["error"]
    content = cell.outputs[0]["content"]
    assert content["ename"] == "ValueError" and content["evalue"] == "bad value"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(content["traceback"]))
    assert "f()" in plain and "ValueError: bad value" in plain
    assert cell.reply["content"]["ename"] == "ValueError"


def test_state_persists_between_cells(kernel):
    kernel.execute("import json\nvalue = 41\nimport os\nos.makedirs('sub', exist_ok=True)\nos.chdir('sub')")
    cell = kernel.execute("value + 1, json.dumps([1]), os.getcwd()")
    result = cell.of_type("execute_result")[0]["content"]["data"]["text/plain"]
    assert result == "(42, '[1]', '/home/sandbox/sub')"
    kernel.execute("os.chdir('/home/sandbox')")


def test_rich_output(kernel):
    cell = kernel.execute("from IPython.display import HTML, display\ndisplay(HTML('<i>hi</i>'))\n6*7")
    assert cell.of_type("display_data")[0]["content"]["data"]["text/html"] == "<i>hi</i>"
    assert cell.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "42"


def test_png_from_matplotlib(kernel):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed in the sandbox interpreter")
    cell = kernel.execute("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    assert cell.status == "ok", cell.outputs
    assert any("image/png" in o["content"]["data"] for o in cell.of_type("display_data"))


def test_input_round_trip(kernel):
    prompts = []

    def answer(prompt):
        prompts.append(prompt)
        return "Ada"

    cell = kernel.execute("name = input('Your name? ')\nprint('hello', name)", stdin=answer)
    assert prompts == ["Your name? "]
    assert "hello Ada" in cell.stream()


def test_input_without_stdin_support_is_a_clear_error(kernel):
    cell = kernel.execute("input('x')")
    assert cell.status == "error"
    assert "does not support input" in cell.reply["content"]["evalue"]


def test_completion_inspection_is_complete(kernel):
    kernel.execute("sandbox_variable = 3")
    msg_id = kernel.kc.complete("sandbox_var", 11)
    reply = kernel.kc.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert "sandbox_variable" in reply["content"]["matches"]
    kernel.kc.inspect("len", 3)
    reply = kernel.kc.get_shell_msg(timeout=10)
    assert reply["content"]["found"] and "text/plain" in reply["content"]["data"]
    kernel.kc.is_complete("for i in range(3):")
    reply = kernel.kc.get_shell_msg(timeout=10)
    assert reply["content"]["status"] == "incomplete"


@pytest.mark.parametrize("code", ["while True: pass", "import time; time.sleep(100)", "!sleep 100"])
def test_interrupt_stops_the_cell(kernel, code):
    # Interrupt once the cell runs (it says so first): a timer fired at a fixed delay could
    # come before the cell started under load. How fast it stops is bench_kernel.py's
    # interrupt_to_reply_s (target 1 s), not a wall-clock assert here.
    # stop_on_error=False: an interrupted cell is an error, and the kernel (as ipykernel does)
    # aborts requests that reach it before it leaves its abort state; the next cell below is
    # sent at once, which under load could land in that window and come back "aborted"
    msg_id = kernel.kc.execute(f"print('started', flush=True)\n{code}", stop_on_error=False)
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=60)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream"
                and "started" in msg["content"]["text"]):  # after "[sandbox] Starting…" if it restarted
            break
    kernel.km.interrupt_kernel()
    while True:
        reply = kernel.kc.get_shell_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    # the kernel stays usable, with its state
    again = kernel.execute("2 + 2")
    results = again.of_type("execute_result")
    assert results and results[0]["content"]["data"]["text/plain"] == "4", again.outputs


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("import os; os._exit(3)", "exited with status 3"),
        ("import ctypes; ctypes.string_at(0)", "SIGSEGV (segmentation fault)"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
    ],
)
def test_crash_is_reported_and_the_next_cell_gets_a_fresh_sandbox(fresh_kernel, code, words):
    kernel = fresh_kernel()
    kernel.execute("marker = 'old sandbox'")
    before = kernel.namespaces()
    cell = kernel.execute(code, timeout=30)
    assert cell.status == "error"
    error = cell.of_type("error")
    assert len(error) == 1 and error[0]["content"]["ename"] == "SandboxCrashed"
    assert words in error[0]["content"]["evalue"]
    assert "fresh sandbox" in " ".join(error[0]["content"]["traceback"])
    assert cell.sandbox["exit_status"] != 0
    after = kernel.execute("'marker' in globals()")
    assert after.status == "ok"
    assert after.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "False"
    # the crashed sandbox's namespace was replaced, not leaked
    assert len(kernel.namespaces()) == 1 and kernel.namespaces() != before


def test_sandbox_killed_from_outside_between_cells(fresh_kernel):
    kernel = fresh_kernel()
    pid_cell = kernel.execute("import os; print(os.getpid())")
    assert pid_cell.status == "ok"
    netns = kernel.namespaces()  # only this kernel's sandbox: others may be running
    assert len(netns) == 1
    pids = []
    for ns in netns:
        pids += os.popen(f"ip netns pids {ns}").read().split()
    own = [p for p in pids if "agent.pyz" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")]
    assert own, "the agent process should be visible from the host"
    for pid in own:
        # killing the first (bubblewrap's outer process) may already have ended the others
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    # "between cells" means the sandbox has ended before the next cell is sent: wait for
    # every process in its namespace to be gone (a fixed sleep was too short under load)
    deadline = time.monotonic() + 60
    while any(os.popen(f"ip netns pids {ns}").read().split() for ns in netns) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.popen(f"ip netns pids {ns}").read().split() for ns in netns)
    cell = kernel.execute("1 + 1", timeout=30)
    # the next cell says what happened and runs in a fresh sandbox; the old one is cleaned up
    assert "the previous sandbox ended" in cell.stream("stderr") and "SIGKILL" in cell.stream("stderr")
    assert cell.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "2"
    assert len(kernel.namespaces()) == 1 and kernel.namespaces() != netns


def test_footer_modes(fresh_kernel):
    quiet = fresh_kernel({"SANDBOX_KERNEL_FOOTER": "on-failure"})
    ok = quiet.execute("print('x')")
    assert ok.stream() == "x\n"
    assert ok.sandbox["exit_status"] == 0
    bad = quiet.execute("!exit 4")
    assert bad.of_type("error")[0]["content"]["traceback"][-1].startswith("exit 4 · ")
    never = fresh_kernel({"SANDBOX_KERNEL_FOOTER": "never"})
    bad = never.execute("1/0")
    assert not any(line.startswith("exit 1") for line in bad.of_type("error")[0]["content"]["traceback"])
    assert bad.sandbox["exit_status"] == 1


def test_config_file_in_the_jupyter_config_dir(fresh_kernel, tmp_path):
    (tmp_path / "sandbox_kernel_config.py").write_text('c.SandboxKernel.footer = "never"\n')
    kernel = fresh_kernel({"JUPYTER_CONFIG_DIR": str(tmp_path)})
    assert kernel.execute("print('plain')").stream() == "plain\n"


def test_bad_administrator_setting_is_reported_and_nothing_runs(fresh_kernel):
    kernel = fresh_kernel({"SANDBOX_KERNEL_POLICY_LOCKED": "maybe"})
    for code in ("open('/tmp/ran', 'w')", "%sandbox status"):
        cell = kernel.execute(code, timeout=30)
        assert cell.status == "error"
        assert cell.reply["content"]["ename"] == "ConfigurationError"
        assert "SANDBOX_KERNEL_POLICY_LOCKED" in cell.reply["content"]["evalue"]
