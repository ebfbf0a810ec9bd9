"""The interpreters that run a cell's code inside the sandbox.

IPython when it is installed (magics, rich display, completion), else a small built-in
interpreter on the standard library (``SANDBOX_AGENT_RUNNER=plain`` chooses it anyway).
Both send what a cell shows through the :class:`~.runner.Agent` that owns them and return
the cell's error (or None); the agent turns that into the cell's exit status.
"""

from __future__ import annotations

import ast
import builtins
import codeop
import os
import sys
import traceback
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import Agent


def system_exit_status(err: SystemExit) -> int:
    """The exit status a cell ended by ``SystemExit`` reports, as a process's would be."""
    code = err.code
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return code & 0xFF if code >= 0 else code
    return 1


def make_interpreter(agent: Agent):
    """IPython's interpreter when it is there and not turned off, else the built-in one."""
    if os.environ.get("SANDBOX_AGENT_RUNNER") == "plain":
        return PlainInterpreter(agent)
    try:
        import IPython  # noqa: F401
    except ImportError:
        return PlainInterpreter(agent)
    return IPythonInterpreter(agent)


class PlainInterpreter:
    """Runs cells with the standard library only: Python, ``!cmd`` lines, ``%%bash``/``%%sh``."""

    ipython_version = None

    def __init__(self, agent: Agent):
        self.agent = agent
        self.ns: dict = {"__name__": "__main__", "__builtins__": builtins}
        builtins.input = agent.input  # type: ignore[assignment]

    def run(self, code: str, count: int, silent: bool, store_history: bool):
        first, _, rest = code.partition("\n")
        head = first.strip()
        if head in ("%%bash", "%%sh"):
            self.agent.system(rest)
            return None
        if head.startswith("%"):
            word = head.split()[0]
            self.agent.send_error("UsageError", f"{word} needs IPython, which is not installed in the sandbox",
                                  [f"UsageError: {word} needs IPython, which is not installed in the sandbox image"])
            return RuntimeError(word)
        try:
            tree = ast.parse(_transform_bang_lines(code), "<cell>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr) and not silent:
                last = ast.Expression(tree.body.pop().value)
            self.ns["__sandbox_system__"] = self.agent.system
            exec(compile(tree, "<cell>", "exec"), self.ns)  # noqa: S102 - running the user's cell is the point
            if last is not None:
                value = eval(compile(last, "<cell>", "eval"), self.ns)  # noqa: S307
                if value is not None:
                    self.ns["_"] = value
                    self.agent.flush_output()
                    self.agent.send({"type": "execute_result", "id": self.agent.cell_id,
                                     "data": _plain_mimebundle(value), "metadata": {},
                                     "execution_count": count})
        except BaseException as err:  # noqa: BLE001 - every error of the cell is reported
            if isinstance(err, SystemExit) and system_exit_status(err) == 0:
                return err
            tb = traceback.format_exception(type(err), err, _user_tb(err.__traceback__))
            self.agent.send_error(type(err).__name__, str(err), "".join(tb).rstrip("\n").split("\n"))
            return err
        return None

    def user_expressions(self, exprs: dict) -> dict:
        out = {}
        for key, expr in exprs.items():
            try:
                value = eval(str(expr), self.ns)  # noqa: S307
                out[key] = {"status": "ok", "data": _plain_mimebundle(value), "metadata": {}}
            except Exception as err:  # noqa: BLE001
                out[key] = {"status": "error", "ename": type(err).__name__, "evalue": str(err),
                            "traceback": []}
        return out

    def complete(self, code: str, cursor_pos: int | None) -> dict:
        import rlcompleter

        pos = len(code) if cursor_pos is None else cursor_pos
        start = pos
        while start > 0 and (code[start - 1].isalnum() or code[start - 1] in "_."):
            start -= 1
        token = code[start:pos]
        completer = rlcompleter.Completer(self.ns)
        matches = []
        for i in range(1000):
            match = completer.complete(token, i)
            if match is None:
                break
            matches.append(match)
        return {"status": "ok", "matches": sorted(set(matches)), "cursor_start": start,
                "cursor_end": pos, "metadata": {}}

    def inspect(self, code: str, cursor_pos: int | None, detail_level: int) -> dict:
        import pydoc

        pos = len(code) if cursor_pos is None else cursor_pos
        start, end = pos, pos
        while start > 0 and (code[start - 1].isalnum() or code[start - 1] in "_."):
            start -= 1
        while end < len(code) and (code[end].isalnum() or code[end] == "_"):
            end += 1
        name = code[start:end]
        try:
            obj = eval(name, self.ns) if name else None  # noqa: S307
        except Exception:  # noqa: BLE001
            return {"status": "ok", "found": False, "data": {}, "metadata": {}}
        text = pydoc.render_doc(obj, renderer=pydoc.plaintext) if name else ""
        return {"status": "ok", "found": bool(name), "data": {"text/plain": text}, "metadata": {}}

    def is_complete(self, code: str) -> dict:
        try:
            compiled = codeop.compile_command(_transform_bang_lines(code), "<cell>", "exec")
        except (SyntaxError, ValueError, OverflowError):
            return {"status": "invalid"}
        if compiled is None:
            return {"status": "incomplete", "indent": "    " if code.rstrip().endswith(":") else ""}
        return {"status": "complete"}


def _transform_bang_lines(code: str) -> str:
    out = []
    for line in code.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("!"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}__sandbox_system__({stripped[1:]!r})")
        else:
            out.append(line)
    return "\n".join(out)


def _user_tb(tb):
    """Drop the agent's own frames from the top and the bottom of a traceback."""
    while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
        tb = tb.tb_next
    _trim_agent_tail(tb)
    return tb


def _is_agent_frame(frame) -> bool:
    return frame.f_globals.get("__name__", "").startswith(("sandbox_agent", "sandbox_kernel.agent"))


def _trim_agent_tail(tb) -> None:
    """Cut the agent's own frames off the bottom of a traceback (an interrupt that lands
    while a print() is being sent, the guard refusing a connection): the user sees where
    their code was, not the agent's plumbing. A traceback with no user frame is kept."""
    last_user = None
    while tb is not None:
        if not _is_agent_frame(tb.tb_frame):
            last_user = tb
        tb = tb.tb_next
    if last_user is not None:
        last_user.tb_next = None


def _plain_mimebundle(value) -> dict:
    data = {"text/plain": repr(value)}
    for mime, method in (("text/html", "_repr_html_"), ("image/png", "_repr_png_"),
                         ("text/markdown", "_repr_markdown_"), ("image/svg+xml", "_repr_svg_")):
        fn = getattr(value, method, None)
        if callable(fn):
            try:
                rendered = fn()
            except Exception:  # noqa: BLE001
                continue
            if rendered is not None:
                data[mime] = rendered
    return data


class IPythonInterpreter:
    """Runs cells in an IPython InteractiveShell whose output goes through the agent."""

    def __init__(self, agent: Agent):
        import IPython
        from IPython.core.displayhook import DisplayHook
        from IPython.core.displaypub import DisplayPublisher
        from IPython.core.interactiveshell import InteractiveShell

        self.agent = agent
        self.ipython_version = IPython.__version__

        class AgentDisplayPublisher(DisplayPublisher):
            def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
                agent.send_display(data, metadata, transient, update)

            def clear_output(self, wait=False):
                agent.flush_output()
                agent.send({"type": "clear_output", "id": agent.cell_id, "wait": bool(wait)})

        class AgentDisplayHook(DisplayHook):
            def start_displayhook(self):
                self._data, self._md = None, None

            def write_output_prompt(self):
                pass

            def write_format_data(self, format_dict, md_dict=None):
                self._data, self._md = format_dict, md_dict or {}

            def finish_displayhook(self):
                if self._data:
                    agent.flush_output()
                    agent.send({"type": "execute_result", "id": agent.cell_id, "data": self._data,
                                "metadata": self._md, "execution_count": self.shell.execution_count})
                self._data, self._md = None, None

        class AgentShell(InteractiveShell):
            def showtraceback(self, exc_tuple=None, *args, **kwargs):
                try:
                    _trim_agent_tail(self._get_exc_info(exc_tuple)[2])
                except ValueError:  # no exception to show
                    pass
                return super().showtraceback(exc_tuple, *args, **kwargs)

            def _showtraceback(self, etype, evalue, stb):
                if etype is SystemExit and system_exit_status(evalue) == 0:
                    return
                agent.send_error(etype.__name__, str(evalue), list(stb))

            def system(self, cmd):
                status = agent.system(self.var_expand(cmd, depth=1))
                self.user_ns["_exit_code"] = status

            def ask_exit(self):
                print("exit() does nothing in the Sandbox kernel: use Kernel → Restart to start a fresh sandbox.")

        warnings.filterwarnings("ignore", message="To exit: use")
        import importlib.util

        # find_spec, not import: importing matplotlib_inline imports matplotlib, which reads
        # MPLBACKEND once, at import
        if importlib.util.find_spec("matplotlib_inline") is not None:
            os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        self.shell = AgentShell.instance(
            display_pub_class=AgentDisplayPublisher,
            displayhook_class=AgentDisplayHook,
            colors="Neutral",
            autocall=0,
            autoindent=False,
            history_length=0,
            history_load_length=0,
        )
        self.shell.Completer.use_jedi = False  # jedi is slow to start and optional
        self.shell.history_manager.enabled = False
        self.shell.history_manager.end_session()
        # ``obj?`` and %page go to the notebook's pager, as in ipykernel
        self.shell.set_hook("show_in_pager", self._page)
        self.shell.register_magic_function(self._shell_cell, "cell", "bash")
        self.shell.register_magic_function(self._shell_cell, "cell", "sh")
        builtins.input = agent.input  # type: ignore[assignment]
        import getpass

        getpass.getpass = lambda prompt="Password: ", stream=None: agent.input(prompt, password=True)
        if "" not in sys.path:
            sys.path.insert(0, "")

    def _page(self, shell, data, start=0, screen_lines=0, pager_cmd=None):
        bundle = data if isinstance(data, dict) else {"text/plain": str(data)}
        self.agent.payload.append({"source": "page", "data": bundle, "start": start})

    def _shell_cell(self, line, cell):
        status = self.agent.system(cell)
        self.shell.user_ns["_exit_code"] = status

    def run(self, code: str, count: int, silent: bool, store_history: bool):
        shell = self.shell
        if count:
            shell.execution_count = count
        result = shell.run_cell(code, store_history=store_history, silent=silent)
        return result.error_before_exec or result.error_in_exec

    def user_expressions(self, exprs: dict) -> dict:
        return self.shell.user_expressions(exprs)

    def complete(self, code: str, cursor_pos: int | None) -> dict:
        pos = len(code) if cursor_pos is None else cursor_pos
        line, offset = _line_at_cursor(code, pos)
        text, matches = self.shell.complete("", line, pos - offset)
        return {"status": "ok", "matches": list(matches), "cursor_start": pos - len(text),
                "cursor_end": pos, "metadata": {}}

    def inspect(self, code: str, cursor_pos: int | None, detail_level: int) -> dict:
        from IPython.utils.tokenutil import token_at_cursor

        pos = len(code) if cursor_pos is None else cursor_pos
        name = token_at_cursor(code, pos)
        try:
            bundle = self.shell.object_inspect_mime(name, detail_level=detail_level)
            found = True
        except KeyError:
            bundle, found = {}, False
        return {"status": "ok", "found": found, "data": bundle, "metadata": {}}

    def is_complete(self, code: str) -> dict:
        status, indent = self.shell.input_transformer_manager.check_complete(code)
        reply = {"status": status}
        if status == "incomplete":
            reply["indent"] = " " * (indent or 0)
        return reply


def _line_at_cursor(code: str, pos: int) -> tuple[str, int]:
    offset = 0
    for line in code.splitlines(True):
        if offset + len(line) >= pos and not (line.endswith("\n") and offset + len(line) == pos):
            return line, offset
        offset += len(line)
    return "", offset
