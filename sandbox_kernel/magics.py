"""``%sandbox …``: see and change the sandbox from the notebook.

Handled in the kernel process, never forwarded to the sandbox: code in the sandbox
must not be able to change its own policy. The magics act on the kernel's
:class:`~sandbox_kernel.controls.Controls`, never on the kernel: every change goes through
:meth:`Controls.set_policy` (the administrator's ceiling, atomic apply), the same path the
policy panel's buttons take.
"""

from __future__ import annotations

import html
import shlex
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import parse_duration
from .controls import clock
from .errors import PolicyError, SandboxError
from .grants import MAX_SECONDS
from .learn import LEARN_MIME
from .policy.model import MODES, parse_entry
from .policy.presets import PRESETS

if TYPE_CHECKING:
    from .controls import Controls

VERBS = ("status", "policy", "allow", "revoke", "mode", "preset", "blocked", "learn", "request", "restart", "help")
LEARN_VERBS = ("start", "stop", "status", "apply", "insert")

HELP = """%sandbox — the sandbox and its egress policy (handled by the kernel, not the sandbox)

  %sandbox status              backend, sandbox, policy in force, enforcer, recent blocks
  %sandbox policy              the policy panel (toggle mode, edit entries, allow blocked)
  %sandbox allow ENTRY…        allow destinations, e.g. api.github.com:443  *.pythonhosted.org
                               10.1.2.0/24:5432/tcp  (switches a default-deny policy to allowlist)
  %sandbox allow ENTRY… --for 10m
                               allow them for a time (90s, 10m, 2h): then they are removed again
  %sandbox revoke ENTRY…       remove allowed destinations
  %sandbox revoke preset NAME… remove presets
  %sandbox mode deny|allowlist default-deny, or only what is allowed
  %sandbox preset NAME         add a named set of destinations ({presets})
  %sandbox blocked             recent blocked connections
  %sandbox learn               record every destination the next cells try (allowed and blocked)
  %sandbox learn stop          stop; show the smallest allowlist for what they tried
  %sandbox learn status        learning or not, destinations so far, the last proposal
  %sandbox learn apply         allow what the proposal says you may (as %sandbox allow does)
  %sandbox learn insert        put the proposal's %sandbox lines into a new cell
  %sandbox request ENTRY… [--reason TEXT]
                               hub mode: ask your administrator for destinations beyond your
                               limits; the answer shows here and in the panel when it comes
  %sandbox restart             replace the sandbox with a fresh one (the policy is kept)
  %sandbox help                this text
"""


class UsageError(SandboxError):
    """A ``%sandbox`` line that cannot be understood; nothing was changed."""

    ename = "UsageError"


@dataclass
class MagicOutput:
    """What one ``%sandbox`` line shows."""

    text: str = ""
    html: str | None = None
    #: extra display_data bundles (e.g. the panel)
    displays: list[dict] = field(default_factory=list)
    #: execute-reply payloads (e.g. set_next_input from %sandbox learn insert)
    payload: list[dict] = field(default_factory=list)


def is_sandbox_line(line: str) -> bool:
    return line.startswith("%sandbox") and (len(line) == 8 or line[8].isspace())


def split_cell(code: str) -> list[tuple[str, str]]:
    """Split a cell into ("magic", line) and ("code", text) parts, in order.

    Only top-level lines that start with ``%sandbox`` are magics; everything else,
    indented lines included, goes to the sandbox unchanged.
    """
    parts: list[tuple[str, str]] = []
    buffer: list[str] = []
    for line in code.split("\n"):
        if is_sandbox_line(line.rstrip()):
            if any(b.strip() for b in buffer):
                parts.append(("code", "\n".join(buffer)))
            buffer = []
            parts.append(("magic", line.rstrip()))
        else:
            buffer.append(line)
    if any(b.strip() for b in buffer):
        parts.append(("code", "\n".join(buffer)))
    return parts


class SandboxMagics:
    """Runs ``%sandbox`` lines against one kernel's controls."""

    def __init__(self, controls: Controls):
        self.controls = controls

    async def run(self, line: str) -> MagicOutput:
        """Run one ``%sandbox …`` line. Raises UsageError / PolicyError (typed, one line)."""
        try:
            words = shlex.split(line[len("%sandbox"):])
        except ValueError as err:
            raise UsageError(f"%sandbox: {err}") from None
        if not words:
            return MagicOutput(HELP.format(presets=", ".join(sorted(PRESETS))))
        verb, args = words[0], words[1:]
        if verb not in VERBS:
            raise UsageError(f"%sandbox {verb}: unknown command; one of {', '.join(VERBS)} (see %sandbox help)")
        return await getattr(self, f"do_{verb}")(args)

    # -- reading ------------------------------------------------------------------
    async def do_help(self, args) -> MagicOutput:
        return MagicOutput(HELP.format(presets=", ".join(sorted(PRESETS))))

    async def do_status(self, args) -> MagicOutput:
        self._no_args("status", args)
        rows = self.controls.status()
        width = max(len(r[0]) for r in rows)
        text = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
        table = "".join(f"<tr><th style='text-align:left'>{html.escape(n)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
                        for n, v in rows)
        return MagicOutput(text, f"<table class='sandbox-kernel-status'>{table}</table>")

    async def do_blocked(self, args) -> MagicOutput:
        self._no_args("blocked", args)
        conns = list(self.controls.recent_blocked)[-50:]
        if not conns:
            return MagicOutput("no blocked connections yet")
        lines = [f"{clock(c.last_seen)}  {c.headline()[2:]}  [{c.verdict}]  {_what_to_do(c)}" for c in conns]
        head = "<tr><th>when</th><th>destination</th><th>process</th><th>verdict</th><th>count</th><th>what you can do</th></tr>"
        body = "".join(
            f"<tr><td>{clock(c.last_seen)}</td><td>{html.escape(c.destination())}</td>"
            f"<td>{html.escape((c.process or {}).get('name') or '')}</td><td>{c.verdict}</td><td>{c.count}</td>"
            f"<td>{html.escape(_what_to_do(c))}</td></tr>"
            for c in conns)
        return MagicOutput("\n".join(lines), f"<table class='sandbox-kernel-blocked'>{head}{body}</table>")

    async def do_policy(self, args) -> MagicOutput:
        self._no_args("policy", args)
        from .widgets import panel_for

        panel = panel_for(self.controls)
        return MagicOutput(displays=[panel.bundle()])

    # -- changing -----------------------------------------------------------------
    async def do_allow(self, args) -> MagicOutput:
        args, seconds = _take_for(args)
        if not args:
            raise UsageError("%sandbox allow: name at least one destination, e.g. %sandbox allow pypi.org:443")
        entries = [parse_entry(a) for a in args]
        return MagicOutput(await self.controls.allow(entries, seconds))

    async def do_revoke(self, args) -> MagicOutput:
        if not args:
            raise UsageError("%sandbox revoke: name at least one allowed destination")
        if args[0] == "preset":  # as %sandbox status lists them: "preset pypi"
            if len(args) == 1:
                raise UsageError("%sandbox revoke preset: name at least one preset in force "
                                 f"({', '.join(self.controls.policy.presets) or 'none is'})")
            return await self._apply(self.controls.policy.with_presets_removed(*args[1:]))
        return await self._apply(self.controls.policy.with_entries_removed(*args))

    async def do_mode(self, args) -> MagicOutput:
        if len(args) != 1 or args[0] not in MODES:
            raise UsageError(f"%sandbox mode: say one of {' | '.join(MODES)}")
        return await self._apply(self.controls.policy.with_mode(args[0]))

    async def do_preset(self, args) -> MagicOutput:
        if len(args) != 1:
            raise UsageError(f"%sandbox preset: name one preset ({', '.join(sorted(PRESETS))})")
        new = self.controls.policy.with_presets_added(args[0])
        if new.mode != "allowlist":
            new = new.with_mode("allowlist")
        return await self._apply(new)

    async def do_learn(self, args) -> MagicOutput:
        learner = self.controls.learner
        verb = args[0] if args else "start"
        if verb not in LEARN_VERBS or len(args) > 1:
            raise UsageError(f"%sandbox learn: say nothing (start) or one of {', '.join(LEARN_VERBS[1:])}")
        if verb == "start":
            return MagicOutput(await learner.start())
        if verb == "status":
            return MagicOutput(learner.status_text())
        if verb == "stop":
            proposal = await learner.stop()
            from .learnview import learn_view_for

            shown = {"text/plain": proposal.text(), "text/html": proposal.html(), LEARN_MIME: proposal.to_json()}
            return MagicOutput(displays=[shown, learn_view_for(self.controls).bundle()])
        if verb == "apply":
            return MagicOutput(await learner.apply())
        payload = learner.insert_payload()
        return MagicOutput(f"the next cell holds: {payload['text'].strip()}", payload=[payload])

    async def do_request(self, args) -> MagicOutput:
        from .access import split_request_args
        from .widgets import request_view_for

        entries, reason = split_request_args(args)
        record = await self.controls.access.request(entries, reason)
        return MagicOutput(f"request {record['id']} sent to your administrator; the answer will show here "
                           "(and in %sandbox policy) when it comes, without a new cell",
                           displays=[request_view_for(self.controls, record["id"]).bundle()])

    async def do_restart(self, args) -> MagicOutput:
        self._no_args("restart", args)
        started = time.monotonic()
        await self.controls.restart()
        return MagicOutput(f"fresh sandbox started in {(time.monotonic() - started):.1f} s "
                           f"(variables were reset; egress: {self.controls.policy.describe()})")

    async def _apply(self, new) -> MagicOutput:
        return MagicOutput(await self.controls.apply(new))

    @staticmethod
    def _no_args(verb: str, args) -> None:
        if args:
            raise UsageError(f"%sandbox {verb} takes no arguments (got {' '.join(args)})")


def _take_for(args: list[str]) -> tuple[list[str], float | None]:
    """Split ``--for DURATION`` (or ``--for=DURATION``) off the arguments of ``allow``."""
    rest, seconds, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg == "--for" or arg.startswith("--for="):
            if seconds is not None:
                raise UsageError("%sandbox allow: give --for once")
            if arg == "--for":
                if i + 1 >= len(args):
                    raise UsageError("%sandbox allow --for: say for how long, e.g. --for 10m")
                value, i = args[i + 1], i + 2
            else:
                value, i = arg.split("=", 1)[1], i + 1
            try:
                seconds = parse_duration(value)
            except ValueError as err:
                raise UsageError(f"%sandbox allow --for: {err}") from None
            if not 0 < seconds <= MAX_SECONDS:
                raise UsageError(f"%sandbox allow --for: between 1 s and {MAX_SECONDS // 86400} days "
                                 f"(got {value}); to allow for good, leave out --for")
            continue
        if arg.startswith("--"):
            raise UsageError(f"%sandbox allow: unknown option {arg} (the one option is --for DURATION)")
        rest.append(arg)
        i += 1
    return rest, seconds


def _what_to_do(conn) -> str:
    """The remedy column of ``%sandbox blocked``: only a verified notice names a command."""
    action = conn.remedy.get("action")
    if action == "allow":
        return conn.remedy["command"]
    if action == "unverified":
        return "reported by the sandbox: nothing offered"
    return "not permitted by your administrator"


__all__ = ["SandboxMagics", "split_cell", "UsageError", "PolicyError"]
