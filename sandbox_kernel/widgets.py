"""PolicyPanel: see and change the egress policy with ipywidgets (``%sandbox policy``).

The widgets live in the kernel process, next to Jupyter, never in the sandbox: a comm
message from the notebook reaches the kernel, and every change still goes through
:meth:`Controls.set_policy` (the administrator's ceiling is checked there, so a
hand-crafted comm message gets no further than the UI would). The kernel's
:class:`~sandbox_kernel.controls.Controls` are the one source of truth: every open panel is
refreshed after any change, from a panel or a ``%sandbox`` line. A blocked connection's
Allow button does exactly what the notice's remedy, ``%sandbox allow ENTRY``, does
(:meth:`Controls.allow`), and only a notice the kernel verified (enforcer, DNS proxy) has
one: rows the sandbox reported show a disabled button.

In hub mode the panel also lists the user's requests for access (``%sandbox request``) with the
administrator's answers, updated when the answer comes; a blocked row an administrator could
grant has a **Request access** button instead of a disabled Allow. :class:`RequestView` is one
request's display in the cell that asked, updated in place the same way.

New rows are batched: a panel redraws its blocked list at most every
:data:`PANEL_INTERVAL` seconds (and when the cell ends), with at most
:data:`MAX_BLOCKED_ROWS` rows, so a flood of blocked connections costs a few comm
messages, not one per connection.
"""

from __future__ import annotations

import asyncio
import html
import time
from typing import TYPE_CHECKING, Awaitable, Callable

import ipywidgets as w

from .access import describe as describe_request
from .errors import SandboxError
from .learnview import learn_view_for
from .policy.model import EgressPolicy, parse_entry
from .policy.presets import PRESETS
from .views import View, error_span, span

if TYPE_CHECKING:
    from .controls import Controls
    from .notices import BlockedConnection

MODE_LABELS = {"deny": "Default-deny", "allowlist": "Allowlist"}
MAX_BLOCKED_ROWS = 20
PANEL_INTERVAL = 0.5


def panel_for(controls: Controls) -> PolicyPanel:
    """A new panel on ``controls`` (called by ``%sandbox policy``)."""
    return PolicyPanel(controls)


class PolicyPanel(View):
    """Mode toggle, entry editor with inline validation, presets, Apply / Revert, status,
    and the recent blocked connections with an Allow button each."""

    def __init__(self, controls: Controls):
        super().__init__(controls)
        self._previous: EgressPolicy | None = None
        self._blocked_keys: set = set()
        self._pending: dict = {}  # key -> connection, waiting for the next batch
        self._row_keys: dict = {}  # key -> its row, for the rows shown
        self._flush: asyncio.TimerHandle | None = None
        self._allow_buttons: list[tuple[w.Button, str]] = []  # (button, the entry it would add)
        locked = controls.admin.locked

        self.title = w.HTML()
        self.mode = w.ToggleButtons(options=list(MODE_LABELS.values()), description="Egress",
                                    tooltips=["Nothing leaves the sandbox", "Only the listed destinations"],
                                    disabled=locked)
        self.entries = w.Textarea(placeholder="one destination per line, e.g.\npypi.org:443\n*.pythonhosted.org\n10.1.2.0/24:5432/tcp",
                                  layout=w.Layout(width="32em", height="7em"), description="Allow",
                                  disabled=locked)
        self.validation = w.HTML()
        self.preset_buttons = [w.ToggleButton(description=name, tooltip=", ".join(str(e) for e in PRESETS[name]),
                                              disabled=locked)
                               for name in sorted(PRESETS)]
        self.apply = w.Button(description="Apply", button_style="primary", icon="check",
                              tooltip="Enforce this policy", disabled=locked)
        self.revert = w.Button(description="Revert", icon="undo",
                               tooltip="Discard edits, or undo the last Apply", disabled=locked)
        self.status = w.HTML()
        self.blocked_box = w.VBox()
        self.learn = learn_view_for(controls)
        # hub mode: the requests for access and the administrator's answers, updated as they come
        self.requests = w.HTML()
        self.requests.add_class("sandbox-kernel-requests")
        self.widget = w.VBox([
            self.title, self.mode, self.entries, self.validation,
            w.HBox([w.Label("Presets"), *self.preset_buttons]),
            w.HBox([self.apply, self.revert]), self.status,
            w.HTML("<b>Recently blocked</b>"), self.blocked_box,
            *([self.requests] if controls.access.available else []), self.learn.widget,
        ], layout=w.Layout(border="1px solid #ccc", padding="6px", width="fit-content"))
        self.access_changed()

        self.show_policy()
        self.mode.observe(self._edited, names="value")
        self.entries.observe(self._edited, names="value")
        for button in self.preset_buttons:
            button.observe(self._edited, names="value")
        self.on_click(self.apply, self.do_apply)
        self.on_click(self.revert, self.do_revert)
        for conn in list(controls.recent_blocked)[-MAX_BLOCKED_ROWS:]:
            self.add_blocked(conn)

    # -- what the controls tell ----------------------------------------------------------
    def policy_changed(self) -> None:
        self.show_policy()

    def blocked_added(self, conn: BlockedConnection) -> None:
        self.queue_blocked(conn)

    def cell_ended(self) -> None:
        self.flush_blocked()

    def access_changed(self) -> None:
        records = list(self.controls.access.requests.values())[-10:]
        self.requests.value = ("<b>Requests for access</b><ul style='margin:2px 0'>"
                               + "".join(f"<li>{html.escape(describe_request(r))}</li>" for r in records)
                               + "</ul>") if records else ""

    # -- display ------------------------------------------------------------------------
    def bundle(self) -> dict:
        """The display_data bundle that shows this panel."""
        return self.mimebundle(f"Sandbox egress policy: {self.controls.policy.describe()} (open in JupyterLab to edit)")

    def show_policy(self) -> None:
        """Set the controls to the policy in force (discarding edits)."""
        policy = self.controls.policy
        self._quiet = True
        try:
            self.mode.value = MODE_LABELS[policy.mode]
            self.entries.value = "\n".join(str(e) for e in policy.entries)
            for button in self.preset_buttons:
                button.value = button.description in policy.presets
        finally:
            self._quiet = False
        lock = " · <b>locked by your administrator (exam mode)</b>: you can look, not change" if self.controls.admin.locked else ""
        self.title.value = (f"<b>Sandbox egress policy</b> — in force: {html.escape(policy.describe())}{lock}")
        self._mark_allowed()
        self.validation.value = ""
        if not self.status.value.startswith("<span class='sk-error'"):
            self.status.value = self._enforced_text()

    def _mark_allowed(self) -> None:
        """Blocked rows whose destination the policy in force now allows say so."""
        policy = self.controls.policy
        in_force = {str(e) for e in policy.entries} if policy.mode == "allowlist" else set()
        for button, entry in self._allow_buttons:
            if entry in in_force:
                button.disabled, button.description, button.icon = True, "Allowed", "check"

    def _enforced_text(self) -> str:
        enforcer, when = self.controls.enforcement()
        stamp = time.strftime("%H:%M:%S", time.localtime(when)) if when else "at start"
        return span("sk-enforced", f"enforced by {enforcer if enforcer is not None else 'the backend'} ({stamp})")

    # -- editing ------------------------------------------------------------------------
    _quiet = False

    def _edited(self, change) -> None:
        if self._quiet:
            return
        _, errors = self._proposal()
        self.validation.value = "".join(
            f"<div class='sk-invalid' style='color:#c62828'>✗ {html.escape(err)}</div>" for err in errors)
        self.status.value = span("sk-pending", "pending: press Apply to enforce")

    def _proposal(self) -> tuple[EgressPolicy | None, list[str]]:
        """The policy the controls describe, or the errors that prevent it."""
        errors, entries = [], []
        for line in self.entries.value.splitlines():
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                entries.append(parse_entry(text))
            except SandboxError as err:
                errors.append(str(err))
        if errors:
            return None, errors
        mode = "allowlist" if self.mode.value == MODE_LABELS["allowlist"] else "deny"
        presets = tuple(b.description for b in self.preset_buttons if b.value)
        try:
            policy = EgressPolicy(mode=mode, entries=tuple(dict.fromkeys(entries)), presets=presets,
                                  name=self.controls.policy.name)
        except SandboxError as err:
            return None, [str(err)]
        return policy, []

    # -- actions (run on the kernel's event loop) ------------------------------------------
    async def do_apply(self) -> None:
        proposal, errors = self._proposal()
        if proposal is None:
            self.status.value = error_span(f"not applied: {errors[0]}")
            return
        await self._set(proposal, remember=True)

    async def do_revert(self) -> None:
        current = self.controls.policy
        proposal, _ = self._proposal()
        if proposal != current:  # pending edits: discard them
            self.status.value = ""
            self.show_policy()
            return
        if self._previous is not None:
            previous, self._previous = self._previous, None
            await self._set(previous, remember=False)

    async def _set(self, policy: EgressPolicy, remember: bool) -> None:
        started = time.monotonic()

        async def change() -> str:
            await self.controls.set_policy(policy)
            # set_policy has refreshed every panel already; this one also says how long it took
            return f"enforced in {(time.monotonic() - started) * 1000:.0f} ms"

        await self._change(change, remember)

    async def _change(self, change: Callable[[], Awaitable[str]], remember: bool) -> None:
        """Run one change of the policy; the status line says how it went (``remember``: Revert
        goes back to the policy before it)."""
        before = self.controls.policy
        self.status.value = span("sk-applying", "applying…")
        try:
            text = await change()
        except SandboxError as err:
            self.status.value = error_span(f"not applied, nothing changed: {err}")
            return
        if remember:
            self._previous = before
        self.status.value = span("sk-enforced", text)

    # -- blocked connections ------------------------------------------------------------------
    def queue_blocked(self, conn: BlockedConnection) -> None:
        """Show ``conn`` with the next batch (at most one redraw per PANEL_INTERVAL)."""
        if conn.key() in self._blocked_keys:
            return
        self._pending[conn.key()] = conn
        while len(self._pending) > MAX_BLOCKED_ROWS:  # only the newest rows could be shown anyway
            self._pending.pop(next(iter(self._pending)))
        if self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush_blocked()
                return
            self._flush = loop.call_later(PANEL_INTERVAL, self.flush_blocked)

    def flush_blocked(self) -> None:
        """Add the queued rows in one redraw."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        pending, self._pending = list(self._pending.values()), {}
        if not pending:
            return
        rows = [self._row(conn) for conn in pending if conn.key() not in self._blocked_keys]
        self._add_rows([r for r in rows if r is not None])

    def add_blocked(self, conn: BlockedConnection) -> None:
        """Add one row now (the panel's construction; tests)."""
        row = self._row(conn)
        if row is not None:
            self._add_rows([row])

    def _add_rows(self, new_rows: list) -> None:
        rows = [*self.blocked_box.children, *new_rows][-MAX_BLOCKED_ROWS:]
        self.blocked_box.children = tuple(rows)
        shown = {id(r) for r in rows}
        # forget what scrolled out, so the keys and buttons stay as few as the rows
        self._row_keys = {k: r for k, r in self._row_keys.items() if id(r) in shown}
        self._blocked_keys = set(self._row_keys)
        self._allow_buttons = [(b, e) for b, e in self._allow_buttons if any(b in r.children for r in rows)]

    def _row(self, conn: BlockedConnection):
        key = conn.key()
        if key in self._blocked_keys:
            return None
        self._blocked_keys.add(key)
        label = w.HTML(f"<code>{html.escape(conn.destination())}</code> ({html.escape(conn.protocol)}, {conn.verdict})")
        if conn.remedy.get("action") == "allow":
            button = w.Button(description="Allow", icon="unlock", tooltip=conn.remedy["command"],
                              disabled=self.controls.admin.locked)
            button.on_click(lambda _, entry=conn.remedy["entry"]: self._spawn(self._allow(entry)))
            self._allow_buttons.append((button, conn.remedy.get("entry", "")))
            self._mark_allowed()
        elif conn.remedy.get("request"):
            # beyond the ceiling, but an administrator could grant it (hub mode)
            reason = conn.remedy.get("reason", "not permitted by your administrator")
            button = w.Button(description="Request access", icon="envelope", tooltip=conn.remedy["request"],
                              disabled=self.controls.admin.locked)
            button.add_class("sandbox-kernel-request-access")
            button.on_click(lambda _, entry=conn.remedy["entry"]: self._spawn(self._request(entry)))
            label.value += f" <span style='color:#888'>— {html.escape(reason)}</span>"
        else:
            reason = conn.remedy.get("reason", "not permitted by your administrator")
            button = w.Button(description="Allow", icon="ban", disabled=True, tooltip=reason)
            label.value += f" <span style='color:#888'>— {html.escape(reason)}</span>"
        row = w.HBox([button, label])
        self._row_keys[key] = row
        return row

    async def _allow(self, entry: str) -> None:
        """The Allow button: what the notice's remedy, ``%sandbox allow ENTRY``, does."""
        await self._change(lambda: self.controls.allow([parse_entry(entry)]), remember=True)

    async def _request(self, entry: str) -> None:
        """The Request access button: what ``%sandbox request ENTRY`` does (no reason given)."""
        async def ask() -> str:
            record = await self.controls.access.request([entry], "")
            return f"request {record['id']} sent to your administrator"

        await self._change(ask, remember=False)


def request_view_for(controls: Controls, request_id: str) -> RequestView:
    """The display of one request for access (``%sandbox request``)."""
    return RequestView(controls, request_id)


class RequestView(View):
    """One request for access and its state, in the cell that asked; it changes in place when
    the administrator's answer comes (the service's ``hub_access`` frame, access.py)."""

    COLOURS = {"pending": "#9a6700", "granted": "#1a7f37", "denied": "#c62828"}

    def __init__(self, controls: Controls, request_id: str):
        super().__init__(controls)
        self.request_id = request_id
        self.widget = w.HTML()
        self.widget.add_class("sandbox-kernel-request")
        # the controls hold views weakly; ipywidgets keeps the widget while it is shown, and the
        # widget keeps its view (a panel's buttons' callbacks do the same for the panel)
        self.widget._sandbox_view = self
        self.access_changed()

    def _record(self) -> dict:
        return self.controls.access.requests.get(self.request_id) or {"id": self.request_id}

    def access_changed(self) -> None:
        record = self._record()
        state = str(record.get("state", "pending"))
        colour = self.COLOURS.get(state, "#555")
        self.widget.value = (f"<div class='sandbox-kernel-request-{html.escape(state)}' style='border-left:4px solid "
                             f"{colour};background:#f6f8fa;color:#222;padding:4px 8px;margin:2px 0;font-size:12px'>"
                             f"{html.escape(describe_request(record))}</div>")

    def bundle(self) -> dict:
        data = self.mimebundle(describe_request(self._record()))
        data["text/html"] = self.widget.value  # front ends without widgets show the state at the time
        return data
