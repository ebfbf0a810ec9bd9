"""PolicyPanel: see and change the egress policy with ipywidgets (``%sandbox policy``).

The widgets live in the kernel process, next to Jupyter, never in the sandbox: a comm
message from the notebook reaches the kernel, and every change still goes through
:meth:`SandboxKernel.set_policy` (the administrator's ceiling is checked there, so a
hand-crafted comm message gets no further than the UI would). The kernel is the one
source of truth: every open panel is refreshed after any change, from a panel or a
``%sandbox`` line. A blocked connection's Allow button runs exactly the notice's remedy,
``%sandbox allow …``, and only a notice the kernel verified (enforcer, DNS proxy) has one:
rows the sandbox reported show a disabled button.

New rows are batched: a panel redraws its blocked list at most every
:data:`PANEL_INTERVAL` seconds (and when the cell ends), with at most
:data:`MAX_BLOCKED_ROWS` rows, so a flood of blocked connections costs a few comm
messages, not one per connection.
"""

from __future__ import annotations

import asyncio
import html
import time
import weakref
from typing import TYPE_CHECKING

import ipywidgets as w

from .errors import SandboxError
from .learnview import learn_view_for
from .policy.model import EgressPolicy, parse_entry
from .policy.presets import PRESETS

if TYPE_CHECKING:
    from .kernel import SandboxKernel
    from .notices import BlockedConnection

MODE_LABELS = {"deny": "Default-deny", "allowlist": "Allowlist"}
MAX_BLOCKED_ROWS = 20
PANEL_INTERVAL = 0.5

_panels: weakref.WeakSet = weakref.WeakSet()


def panel_for(kernel: SandboxKernel) -> PolicyPanel:
    """A new panel on ``kernel`` (called by ``%sandbox policy``)."""
    panel = PolicyPanel(kernel)
    _panels.add(panel)
    return panel


def refresh_all(kernel: SandboxKernel) -> None:
    """Show the policy in force in every open panel (called by the kernel after a change)."""
    for panel in list(_panels):
        if panel.kernel is kernel:
            panel.show_policy()


def blocked_everywhere(kernel: SandboxKernel, conn: BlockedConnection) -> None:
    """Add a blocked connection to every open panel's list (called by the kernel); shown
    with the panel's next batch."""
    for panel in list(_panels):
        if panel.kernel is kernel:
            panel.queue_blocked(conn)


def flush_everywhere(kernel: SandboxKernel) -> None:
    """Show the queued rows now (called by the kernel when a cell ends)."""
    for panel in list(_panels):
        if panel.kernel is kernel:
            panel.flush_blocked()


class PolicyPanel:
    """Mode toggle, entry editor with inline validation, presets, Apply / Revert, status,
    and the recent blocked connections with an Allow button each."""

    def __init__(self, kernel: SandboxKernel):
        self.kernel = kernel
        self._previous: EgressPolicy | None = None
        self._blocked_keys: set = set()
        self._pending: dict = {}  # key -> connection, waiting for the next batch
        self._row_keys: dict = {}  # key -> its row, for the rows shown
        self._flush: asyncio.TimerHandle | None = None
        self._allow_buttons: list[tuple[w.Button, str]] = []  # (button, the entry it would add)
        locked = kernel.admin.locked

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
        self.learn = learn_view_for(kernel)
        # hub mode: the requests for access and the administrator's answers, updated as they come
        extra = [kernel.access.summary_widget()] if kernel.access.available else []
        self.widget = w.VBox([
            self.title, self.mode, self.entries, self.validation,
            w.HBox([w.Label("Presets"), *self.preset_buttons]),
            w.HBox([self.apply, self.revert]), self.status,
            w.HTML("<b>Recently blocked</b>"), self.blocked_box, *extra, self.learn.widget,
        ], layout=w.Layout(border="1px solid #ccc", padding="6px", width="fit-content"))

        self.show_policy()
        self.mode.observe(self._edited, names="value")
        self.entries.observe(self._edited, names="value")
        for button in self.preset_buttons:
            button.observe(self._edited, names="value")
        self.apply.on_click(lambda _: self._spawn(self.do_apply()))
        self.revert.on_click(lambda _: self._spawn(self.do_revert()))
        for conn in list(kernel.recent_blocked)[-MAX_BLOCKED_ROWS:]:
            self.add_blocked(conn)

    # -- display ------------------------------------------------------------------------
    def bundle(self) -> dict:
        """The display_data bundle that shows this panel."""
        data = self.widget._repr_mimebundle_()
        data["text/plain"] = f"Sandbox egress policy: {self.kernel.policy.describe()} (open in JupyterLab to edit)"
        return data

    def show_policy(self) -> None:
        """Set the controls to the policy in force (discarding edits)."""
        policy = self.kernel.policy
        self._quiet = True
        try:
            self.mode.value = MODE_LABELS[policy.mode]
            self.entries.value = "\n".join(str(e) for e in policy.entries)
            for button in self.preset_buttons:
                button.value = button.description in policy.presets
        finally:
            self._quiet = False
        lock = " · <b>locked by your administrator (exam mode)</b>: you can look, not change" if self.kernel.admin.locked else ""
        self.title.value = (f"<b>Sandbox egress policy</b> — in force: {html.escape(policy.describe())}{lock}")
        self._mark_allowed()
        self.validation.value = ""
        if not self.status.value.startswith("<span class='sk-error'"):
            self.status.value = self._enforced_text()

    def _mark_allowed(self) -> None:
        """Blocked rows whose destination the policy in force now allows say so."""
        policy = self.kernel.policy
        in_force = {str(e) for e in policy.entries} if policy.mode == "allowlist" else set()
        for button, entry in self._allow_buttons:
            if entry in in_force:
                button.disabled, button.description, button.icon = True, "Allowed", "check"

    def _enforced_text(self) -> str:
        applied = self.kernel.sandbox_backend.applied
        when = self.kernel.policy_applied_at or applied.get("applied_at")
        stamp = time.strftime("%H:%M:%S", time.localtime(when)) if when else "at start"
        return f"<span class='sk-enforced'>enforced by {html.escape(str(applied.get('enforcer', 'the backend')))} ({stamp})</span>"

    # -- editing ------------------------------------------------------------------------
    _quiet = False

    def _edited(self, change) -> None:
        if self._quiet:
            return
        _, errors = self._proposal()
        self.validation.value = "".join(
            f"<div class='sk-invalid' style='color:#c62828'>✗ {html.escape(err)}</div>" for err in errors)
        self.status.value = "<span class='sk-pending'>pending: press Apply to enforce</span>"

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
                                  name=self.kernel.policy.name)
        except SandboxError as err:
            return None, [str(err)]
        return policy, []

    # -- actions (run on the kernel's event loop) ------------------------------------------
    def _spawn(self, coro) -> None:
        asyncio.ensure_future(coro)

    async def do_apply(self) -> None:
        proposal, errors = self._proposal()
        if proposal is None:
            self.status.value = f"<span class='sk-error' style='color:#c62828'>not applied: {html.escape(errors[0])}</span>"
            return
        await self._set(proposal, remember=True)

    async def do_revert(self) -> None:
        current = self.kernel.policy
        proposal, _ = self._proposal()
        if proposal != current:  # pending edits: discard them
            self.status.value = ""
            self.show_policy()
            return
        if self._previous is not None:
            previous, self._previous = self._previous, None
            await self._set(previous, remember=False)

    async def _set(self, policy: EgressPolicy, remember: bool) -> None:
        before = self.kernel.policy
        self.status.value = "<span class='sk-applying'>applying…</span>"
        started = time.monotonic()
        try:
            await self.kernel.set_policy(policy)
        except SandboxError as err:
            self.status.value = f"<span class='sk-error' style='color:#c62828'>not applied, nothing changed: {html.escape(str(err))}</span>"
            return
        if remember:
            self._previous = before
        ms = (time.monotonic() - started) * 1000
        # set_policy has refreshed every panel already; this one also says how long it took
        self.status.value = f"<span class='sk-enforced'>enforced in {ms:.0f} ms</span>"

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
                              disabled=self.kernel.admin.locked)
            button.on_click(lambda _, command=conn.remedy["command"]: self._spawn(self._allow(command)))
            self._allow_buttons.append((button, conn.remedy.get("entry", "")))
            self._mark_allowed()
        elif conn.remedy.get("request"):
            # beyond the ceiling, but an administrator could grant it (hub mode)
            reason = conn.remedy.get("reason", "not permitted by your administrator")
            button = w.Button(description="Request access", icon="envelope", tooltip=conn.remedy["request"],
                              disabled=self.kernel.admin.locked)
            button.add_class("sandbox-kernel-request-access")
            button.on_click(lambda _, command=conn.remedy["request"]: self._spawn(self._allow(command)))
            label.value += f" <span style='color:#888'>— {html.escape(reason)}</span>"
        else:
            reason = conn.remedy.get("reason", "not permitted by your administrator")
            button = w.Button(description="Allow", icon="ban", disabled=True, tooltip=reason)
            label.value += f" <span style='color:#888'>— {html.escape(reason)}</span>"
        row = w.HBox([button, label])
        self._row_keys[key] = row
        return row

    async def _allow(self, command: str) -> None:
        """The Allow (and Request access) button: exactly the notice's remedy, ``%sandbox allow …``
        (``%sandbox request …``)."""
        before = self.kernel.policy
        self.status.value = "<span class='sk-applying'>applying…</span>"
        try:
            out = await self.kernel.magics.run(command)
        except SandboxError as err:
            self.status.value = f"<span class='sk-error' style='color:#c62828'>not applied, nothing changed: {html.escape(str(err))}</span>"
            return
        self._previous = before
        self.status.value = f"<span class='sk-enforced'>{html.escape(out.text)}</span>"
