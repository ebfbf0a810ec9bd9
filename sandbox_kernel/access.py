"""Requests for access, kernel side (hub mode): ``%sandbox request ENTRY… [--reason TEXT]``.

The request goes to the sandbox service (``HubBackend.request_access``), which records and
audits it; an administrator grants or denies it on the service's admin page. The service tells
the kernel through the sandbox's stream (``hub_access`` frames, hub/access.py), between cells
as well as during one, and :meth:`AccessRequests.on_frame` then, without waiting for a cell:

* makes the service's policy (a granted entry applied at once) and ceiling (widened by exactly
  the granted entries) the kernel's;
* updates the request's display in the cell that asked (a widget, so JupyterLab shows the
  answer at once; ``update_display_data`` for other frontends) and every open policy panel;
* says it in the notebook: in the cell running now, or at the start of the next one.
"""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING

from .errors import PolicyError
from .notices import new_display_id
from .policy.admin import AdminPolicy
from .policy.model import EgressPolicy, parse_entry

if TYPE_CHECKING:
    from .kernel import SandboxKernel

STATE_TEXT = {"pending": "waiting for your administrator", "granted": "granted", "denied": "denied"}
STATE_COLOUR = {"pending": "#9a6700", "granted": "#1a7f37", "denied": "#c62828"}


class AccessRequests:
    """This kernel's requests for access and what the service said about them."""

    def __init__(self, kernel: SandboxKernel):
        self.kernel = kernel
        #: request id -> the service's record of it (the newest word)
        self.requests: dict[str, dict] = {}
        #: request id -> (display id, widget) of the display in the cell that asked
        self._displays: dict[str, tuple[str, object]] = {}
        self._summary = None  # the panels' list (one widget model, shown in every panel)

    @property
    def available(self) -> bool:
        return bool(getattr(self.kernel.sandbox_backend, "takes_requests", False))

    # -- asking ------------------------------------------------------------------------
    async def request(self, entries: list[str], reason: str) -> dict:
        """Send the request; show its display in the running cell. Raises PolicyError for an
        entry that is not one, SandboxError with the service's reason for a refusal."""
        if not self.available:
            raise PolicyError("requests for access go to the hub's sandbox service, which this kernel does not use "
                              f"(backend {self.kernel.sandbox_backend.name}); your administrator sets the "
                              "ceiling in the configuration (c.AdminPolicy.user_may_allow)")
        texts = [str(parse_entry(e)) for e in entries]
        await self.kernel.sandbox.ready()
        record = await self.kernel.sandbox_backend.request_access(texts, reason)
        self.requests[record["id"]] = record
        display_id = new_display_id()
        widget = self._widget(record)
        self._displays[record["id"]] = (display_id, widget)
        self.kernel._publish_display(self._bundle(record, widget), display_id, new=True)
        self._refresh_panels()
        return record

    # -- the service's word -------------------------------------------------------------
    def on_frame(self, frame: dict) -> None:
        """A ``hub_access`` frame (called by the HubBackend's stream, on the event loop)."""
        k = self.kernel
        ceiling = frame.get("ceiling")
        if isinstance(ceiling, dict):
            try:
                k.admin = AdminPolicy(parent=None, **ceiling)
            except Exception as err:  # noqa: BLE001 - keep the old advice rather than none
                k.log.warning("the service sent a ceiling the kernel cannot read: %s", err)
        policy = frame.get("policy")
        if policy is not None:
            try:
                new = EgressPolicy.parse(policy)
            except PolicyError:
                new = None
            if new is not None and new != k.policy:
                k.policy = new
                k.sandbox.policy = new
                k.policy_applied_at = time.time()
            if new is not None:
                k.grants.follow_service(new, frame.get("timed") or {})
        record = frame.get("request")
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            self.requests[record["id"]] = record
            shown = self._displays.get(record["id"])
            if shown is not None:
                display_id, widget = shown
                widget.value = self._html(record)
                k._publish_display(self._bundle(record, widget), display_id, new=False)
        message = frame.get("message")
        if isinstance(message, str) and message:
            k.grants.tell(f"[sandbox] {message[:600]}")
        self._refresh_panels()

    # -- display -------------------------------------------------------------------------
    def _widget(self, record: dict):
        import ipywidgets as w

        return w.HTML(value=self._html(record))

    def _bundle(self, record: dict, widget) -> dict:
        data = dict(widget._repr_mimebundle_())
        data["text/plain"] = self._text(record)
        data["text/html"] = self._html(record)
        return data

    @staticmethod
    def _text(record: dict) -> str:
        state = record.get("state", "pending")
        text = f"access request {record.get('id')} for {', '.join(record.get('entries') or [])}: {STATE_TEXT.get(state, state)}"
        if state != "pending" and record.get("decided_by"):
            text += f" by {record['decided_by']}"
        if record.get("answer"):
            text += f" — {record['answer']}"
        return text

    def _html(self, record: dict) -> str:
        state = record.get("state", "pending")
        colour = STATE_COLOUR.get(state, "#555")
        return (f'<div class="sandbox-kernel-request sandbox-kernel-request-{html.escape(state)}" '
                f'style="border-left:4px solid {colour};background:#f6f8fa;color:#222;padding:4px 8px;'
                f'margin:2px 0;font-size:12px">{html.escape(self._text(record))}</div>')

    def summary_widget(self):
        """The requests list every policy panel shows (one model, updated in place)."""
        import ipywidgets as w

        if self._summary is None:
            self._summary = w.HTML()
            self._summary.add_class("sandbox-kernel-requests")
        self._summary.value = self._summary_html()
        return self._summary

    def _summary_html(self) -> str:
        if not self.requests:
            return ""
        rows = "".join(f"<li>{html.escape(self._text(r))}</li>" for r in list(self.requests.values())[-10:])
        return f"<b>Requests for access</b><ul style='margin:2px 0'>{rows}</ul>"

    def _refresh_panels(self) -> None:
        if self._summary is not None:
            self._summary.value = self._summary_html()
        from .widgets import refresh_all

        refresh_all(self.kernel)


def split_request_args(args: list[str]) -> tuple[list[str], str]:
    """``ENTRY… [--reason TEXT]`` (``--reason=TEXT`` too) → entries, reason."""
    entries, reason, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg == "--reason" or arg.startswith("--reason="):
            if reason is not None:
                raise PolicyError("%sandbox request: give --reason once")
            if arg == "--reason":
                if i + 1 >= len(args):
                    raise PolicyError("%sandbox request --reason: say why, e.g. --reason 'the course's data set'")
                reason, i = args[i + 1], i + 2
            else:
                reason, i = arg.split("=", 1)[1], i + 1
            continue
        if arg.startswith("--"):
            raise PolicyError(f"%sandbox request: unknown option {arg} (the one option is --reason TEXT)")
        entries.append(arg)
        i += 1
    if not entries:
        raise PolicyError("%sandbox request: name at least one destination, e.g. %sandbox request "
                          "data.example.org:443 --reason 'the course data'")
    return entries, reason or ""


__all__ = ["AccessRequests", "split_request_args"]
