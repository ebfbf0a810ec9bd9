"""Requests for access, kernel side (hub mode): ``%sandbox request ENTRY… [--reason TEXT]``.

The request goes to the sandbox service (``HubBackend.request_access``), which records and
audits it; an administrator grants or denies it on the service's admin page. The service tells
the kernel through the sandbox's stream (``hub_access`` frames, hub/access.py), between cells
as well as during one, and :meth:`AccessRequests.on_frame` then, without waiting for a cell:

* makes the service's policy (a granted entry applied at once) and ceiling (widened by exactly
  the granted entries) the controls';
* tells the views (:meth:`Controls.access_changed`): the request's display in the cell that
  asked and every open policy panel update in place (widgets.py);
* says it in the notebook: in the cell running now, or at the start of the next one.

Owned by the :class:`~sandbox_kernel.controls.Controls`; knows nothing of widgets.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .errors import PolicyError
from .policy.admin import AdminPolicy
from .policy.model import EgressPolicy, parse_entry

if TYPE_CHECKING:
    from .controls import Controls

STATE_TEXT = {"pending": "waiting for your administrator", "granted": "granted", "denied": "denied"}


class AccessRequests:
    """This kernel's requests for access and what the service said about them."""

    def __init__(self, controls: Controls):
        self.controls = controls
        #: request id -> the service's record of it (the newest word), oldest first
        self.requests: dict[str, dict] = {}

    @property
    def available(self) -> bool:
        """Whether an administrator can be asked (the backend is the hub's sandbox service)."""
        return bool(getattr(self.controls.backend, "takes_requests", False))

    async def request(self, entries: list[str], reason: str) -> dict:
        """Send the request; return the service's record of it. Raises PolicyError for an entry
        that is not one (or without a service to ask), SandboxError with the service's reason
        for a refusal."""
        c = self.controls
        if not self.available:
            raise PolicyError("requests for access go to the hub's sandbox service, which this kernel does not use "
                              f"(backend {c.backend.name}); your administrator sets the ceiling in the "
                              "configuration (c.AdminPolicy.user_may_allow)")
        texts = [str(parse_entry(e)) for e in entries]
        await c.session.ready()
        record = await c.backend.request_access(texts, reason)
        self.requests[record["id"]] = record
        c.access_changed()
        return record

    def on_frame(self, frame: dict) -> None:
        """A ``hub_access`` frame (called by the HubBackend's stream, on the event loop)."""
        c = self.controls
        ceiling = frame.get("ceiling")
        if isinstance(ceiling, dict):
            try:
                c.admin = AdminPolicy(parent=None, **ceiling)
            except Exception as err:  # noqa: BLE001 - keep the old advice rather than none
                c.log.warning("the service sent a ceiling the kernel cannot read: %s", err)
        changed = False
        policy = frame.get("policy")
        new = None
        if policy is not None:
            try:
                new = EgressPolicy.parse(policy)
            except PolicyError:
                new = None
        if new is not None:
            if new != c.policy:
                c.policy = new
                c.session.policy = new
                c.applied_at = time.time()
                changed = True
            c.grants.follow_service(new, frame.get("timed") or {})
        record = frame.get("request")
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            self.requests[record["id"]] = record
        message = frame.get("message")
        if isinstance(message, str) and message:
            c.grants.tell(f"[sandbox] {message[:600]}")
        if changed:
            c.policy_changed()
        c.access_changed()


def describe(record: dict) -> str:
    """``access request 3f… for a.example.org:443: denied by teacher — not for this course``."""
    state = record.get("state", "pending")
    text = (f"access request {record.get('id')} for {', '.join(map(str, record.get('entries') or []))}: "
            f"{STATE_TEXT.get(state, state)}")
    if state != "pending" and record.get("decided_by"):
        text += f" by {record['decided_by']}"
    if record.get("answer"):
        text += f" — {record['answer']}"
    return text


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


__all__ = ["AccessRequests", "describe", "split_request_args"]
