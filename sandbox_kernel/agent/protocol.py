"""The agent protocol: how the kernel and the agent inside the sandbox talk.

Standard library only: this module runs on both sides (the kernel imports it as
``sandbox_kernel.agent.protocol``, the sandbox as ``sandbox_agent.protocol``).

Framing
-------
One frame is one JSON object encoded as UTF-8 on a single line, terminated by ``\\n``
(``json.dumps`` escapes every newline inside strings, so a frame never spans lines).
A frame longer than :data:`MAX_FRAME` bytes is a protocol error; senders keep stream
chunks to :data:`STREAM_CHUNK` bytes so ordinary output never comes near the limit.
Every frame has a ``"type"``. Frames that belong to a request carry its ``"id"``.
The transport is any byte stream: pipes to a process in a local sandbox, or the
stdin/stdout channels of a Kubernetes exec stream.

Agent → kernel
--------------
``hello``          {version, pid, python, ipython} — first frame, once per attach
``stream``         {id, name: stdout|stderr, text}
``display``        {id, data, metadata, transient, update}
``execute_result`` {id, data, metadata, execution_count}
``clear_output``   {id, wait}
``error``          {id, ename, evalue, traceback: [str]}
``input_request``  {id, prompt, password}
``blocked``        {id, record} — a connection the guard or watcher saw blocked (``record``: a
                   :class:`BlockedRecord`; the kernel decides the ``source``, never the agent)
``reached``        {id, record} — learn mode, when the kernel asks (``report_allowed`` in the
                   policy): a connection the guard let through
``done``           {id, nonce, status: ok|error, exit_status, duration_ms, execution_count,
                    payload, user_expressions} — ``nonce`` is the one of the ``execute`` it ends
``reply``          {id, content} — answer to complete / inspect / is_complete
``pong``           {id}

Kernel → agent
--------------
``execute``        {id, nonce, code, silent, store_history, user_expressions, allow_stdin}
                   (``nonce``: a fresh secret per cell that the agent's ``done`` echoes, so a
                   ``done`` written by other code in the sandbox is told apart; see
                   docs/security.md for what it does and does not prove)
``input_reply``    {id, value} (value ``None`` means the user interrupted)
``interrupt``      {} — raise KeyboardInterrupt in the running cell and its processes
``complete``       {id, code, cursor_pos}
``inspect``        {id, code, cursor_pos, detail_level}
``is_complete``    {id, code}
``policy``         {policy} — the policy in force, for the guard and the notices
``ping``           {id}
``shutdown``       {}
``resume``         {client, since} — a client's first frame (socket channel only)

Sandbox service → kernel (hub mode only; the agent cannot send these: its frames are decoded
against :data:`AGENT_TYPES`)
--------------------------------------------------------------------------------------------
``hub_enforcer_blocked`` {record} — a record of the sandbox's enforcer (NFLOG, DNS proxy)
``hub_policy``           {policy, reason} — the policy an administrator's ceiling imposed
``hub_access``           {event, message, request, policy, ceiling, timed} — a request for access
                         decided, a grant or a timed entry ended (sandbox_kernel/hub/access.py)

Sequence numbers (socket channel only, i.e. Kubernetes exec): agent frames carry ``seq``,
and ``done``/``reply``/``pong`` also ``ack`` (the highest kernel ``seq`` processed); kernel
frames carry ``seq`` too, numbered per client (``client`` in ``resume``: one per transport).
After a dropped stream the kernel re-attaches, sends ``resume {client, since: <last agent
seq it received>}`` and resends its frames the agent has not
acknowledged; each side drops what it already has by ``seq``. Nothing in flight is lost.

Errors: a frame the kernel cannot decode or check (bad JSON, nesting too deep, a wrong field
type, a frame longer than :data:`MAX_FRAME`, a stream that ends inside a frame) is a protocol
error. The kernel does not guess what a broken stream meant: it ends that sandbox, says so in
plain words, and starts a fresh one for the next cell.

Exit status (the contract the kernel relies on): 0 when a cell completed, 1 when it
raised, ``n`` for ``SystemExit(n)``, and for a cell whose last action was a shell
command (``!cmd``, ``%%bash``) that command's exit status.
"""

from __future__ import annotations

import json
import time
from typing import TypedDict

VERSION = 2  # 2: execute/done carry the cell's nonce
MAX_FRAME = 16 * 1024 * 1024
STREAM_CHUNK = 64 * 1024

AGENT_TYPES = frozenset(
    {
        "hello",
        "stream",
        "display",
        "execute_result",
        "clear_output",
        "error",
        "input_request",
        "blocked",
        "reached",
        "done",
        "reply",
        "pong",
    }
)
#: frames only the hub's sandbox service makes (see above)
ENFORCER_FRAME = "hub_enforcer_blocked"
POLICY_FRAME = "hub_policy"
ACCESS_FRAME = "hub_access"
SERVICE_TYPES = frozenset({ENFORCER_FRAME, POLICY_FRAME, ACCESS_FRAME})
KERNEL_TYPES = frozenset(
    {
        "execute",
        "input_reply",
        "interrupt",
        "complete",
        "inspect",
        "is_complete",
        "policy",
        "ping",
        "shutdown",
        "resume",
    }
)


class FrameError(ValueError):
    """A frame that is not valid protocol (bad JSON, not an object, unknown type, too long)."""


def encode(frame: dict) -> bytes:
    """Encode one frame (a dict with a ``type``) as a line of bytes."""
    data = json.dumps(frame, separators=(",", ":"), ensure_ascii=False, default=str).encode(
        "utf-8", "surrogatepass"
    )
    if len(data) >= MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes exceeds the {MAX_FRAME}-byte limit")
    return data + b"\n"


def decode(line: bytes, allowed: frozenset[str]) -> dict:
    """Decode one line into a frame whose type is in ``allowed``; raise FrameError otherwise."""
    if len(line) > MAX_FRAME:
        raise FrameError(f"frame of {len(line)} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        frame = json.loads(line.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError) as err:
        raise FrameError(f"not a JSON frame: {err}") from None
    except RecursionError:
        # b"[" * 200000: json's decoder recurses once per level
        raise FrameError("not a JSON frame: nested too deeply") from None
    if not isinstance(frame, dict):
        raise FrameError(f"frame is a {type(frame).__name__}, not an object")
    kind = frame.get("type")
    if not isinstance(kind, str) or kind not in allowed:
        raise FrameError(f"unknown frame type {kind!r}")
    return frame


_NUMBER = (int, float)
#: field -> accepted types, per agent frame type (fields not listed are ignored)
_AGENT_FIELDS: dict[str, dict[str, tuple]] = {
    "hello": {"version": (int,)},
    "stream": {"name": (str,), "text": (str,)},
    "display": {"data": (dict,), "metadata": (dict, type(None)), "transient": (dict, type(None)),
                "update": (bool, type(None))},
    "execute_result": {"data": (dict,), "metadata": (dict, type(None))},
    "clear_output": {"wait": (bool, type(None))},
    "error": {"ename": (str,), "evalue": (str,), "traceback": (list,)},
    "input_request": {"prompt": (str,), "password": (bool, type(None))},
    "blocked": {"record": (dict,)},
    "reached": {"record": (dict,)},
    "done": {"nonce": (str, type(None)), "status": (str,), "exit_status": (int,), "duration_ms": _NUMBER,
             "payload": (list, type(None)), "user_expressions": (dict, type(None))},
    "reply": {"content": (dict,)},
    "pong": {},
}
_OPTIONAL = {"nonce", "metadata", "transient", "update", "wait", "password", "payload", "user_expressions"}


def check_agent_frame(frame: dict) -> dict:
    """Check the fields of a frame from the agent (the sandbox is not trusted); the kernel
    calls this on every frame. Raises FrameError naming the bad field."""
    for field, types in _AGENT_FIELDS.get(frame["type"], {}).items():
        if field not in frame:
            if field in _OPTIONAL:
                continue
            raise FrameError(f"{frame['type']} frame without {field!r}")
        value = frame[field]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise FrameError(f"{frame['type']} frame: {field!r} is a {type(value).__name__}")
    if frame["type"] == "stream" and frame["name"] not in ("stdout", "stderr"):
        raise FrameError(f"stream frame: unknown stream {frame['name']!r}")
    if frame["type"] == "error" and not all(isinstance(line, str) for line in frame["traceback"]):
        raise FrameError("error frame: traceback lines must be strings")
    return frame


# -- the blocked-connection record ---------------------------------------------------------
#: how a connection was stopped: refused by the enforcer, dropped (the enforcer's silent drop,
#: or the watcher's SYN that got no answer), or failed at once by the guard
VERDICTS = ("rejected", "dropped", "guarded")
#: the protocols a record may name ("dns": a lookup the DNS proxy refused)
RECORD_PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6", "sctp", "dns")


class ProcessInfo(TypedDict):
    """The sandbox process behind a connection (either field may be unknown)."""

    name: str | None
    pid: int | None


class _RecordFields(TypedDict):
    host: str | None
    ip: str | None
    port: int | None
    protocol: str  # one of RECORD_PROTOCOLS
    verdict: str  # one of VERDICTS; "allowed" in learn mode's reports of what got through
    process: ProcessInfo | None
    first_seen: float
    last_seen: float
    count: int


class BlockedRecord(_RecordFields, total=False):
    """One blocked (or, in learn mode, allowed) connection, as every reporter writes it: the
    agent's guard and watcher (in ``blocked``/``reached`` frames), the local enforcer's log
    (NFLOG), the DNS proxy, and the kernel. The notices read it (notices.py), and the hub
    service audits it. A record from the sandbox is untrusted: readers check every field."""

    #: one attempt's identity, so that two reporters of the same attempt count it once
    attempt: str
    #: learn mode, protocol "dns": the addresses the resolver answered
    addresses: list


def blocked_record(*, protocol: str, verdict: str, host: str | None = None, ip: str | None = None,
                   port: int | None = None, process: ProcessInfo | None = None,
                   first_seen: float | None = None, last_seen: float | None = None,
                   attempt: str | None = None) -> BlockedRecord:
    """A record of one attempt seen now (or at ``first_seen``/``last_seen``)."""
    now = time.time()
    first = now if first_seen is None else first_seen
    record: BlockedRecord = {
        "host": host, "ip": ip, "port": port, "protocol": protocol, "verdict": verdict, "process": process,
        "first_seen": first, "last_seen": first if last_seen is None else last_seen, "count": 1,
    }
    if attempt is not None:
        record["attempt"] = attempt
    return record
