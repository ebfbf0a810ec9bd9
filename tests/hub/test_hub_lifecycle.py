"""The service collects what kernels leave behind: a sandbox no kernel is attached to for
``abandoned_after`` seconds is stopped (its namespace removed, audited), a connected kernel is
never collected however idle, one that re-attaches in time keeps its sandbox, and records of
ended sandboxes are forgotten ``keep_stopped`` seconds later."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

from tornado import httpclient, websocket

from kerneltest import sandbox_namespaces

ABANDONED_AFTER = 3


async def _stream(svc, token: str, sid: str):
    """Open a sandbox's execution stream as a kernel would (returns the websocket)."""
    url = "ws" + svc.url[4:] + f"api/sandboxes/{sid}/stream"
    request = httpclient.HTTPRequest(url, headers={"Authorization": f"token {token}"})
    return await websocket.websocket_connect(request)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_abandoned_sandboxes_are_collected_and_connected_ones_are_not(spare_service, hub):
    svc = spare_service(env={"SANDBOX_HUB_ABANDONED_AFTER": str(ABANDONED_AFTER), "SANDBOX_HUB_KEEP_STOPPED": "4"})
    token = hub.tokens["alice"]

    def create(kernel_id: str) -> dict:
        r = svc.api("POST", "api/sandboxes", token, proxied=False, json={"kernel_id": kernel_id})
        assert r.status_code in (200, 201), r.text
        return r.json()

    def state(sid: str) -> str | None:
        r = svc.api("GET", f"api/sandboxes/{sid}", token, proxied=False)
        return r.json()["state"] if r.status_code == 200 else None

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # tornado's websocket futures belong to the current loop
    try:
        never = create("k-never-attached")  # the kernel died before it attached
        dropped = create("k-dropped")  # the kernel attached, then was killed
        kept = create("k-connected")  # the kernel stays connected, idle
        blip = create("k-reconnects")  # the kernel's stream drops and comes back in time
        ws_dropped = loop.run_until_complete(_stream(svc, token, dropped["id"]))
        ws_kept = loop.run_until_complete(_stream(svc, token, kept["id"]))
        ws_blip = loop.run_until_complete(_stream(svc, token, blip["id"]))
        for ws in (ws_dropped, ws_kept, ws_blip):
            assert loop.run_until_complete(ws.read_message())  # the agent's greeting
        ws_dropped.close()  # as a SIGKILLed kernel's socket does
        started = time.monotonic()

        # the blip: gone for a second, back well inside the window, twice
        ws_blip.close()
        for attempt in range(2):
            loop.run_until_complete(asyncio.sleep(1.0))
            ws_blip = loop.run_until_complete(_stream(svc, token, blip["id"]))
            loop.run_until_complete(ws_blip.read_message())
            if attempt == 0:
                ws_blip.close()

        _wait(lambda: state(never["id"]) == "stopped" and state(dropped["id"]) == "stopped",
              ABANDONED_AFTER + 90, "abandoned sandboxes were not collected")  # a bound, not a timing
        assert time.monotonic() - started >= ABANDONED_AFTER - 1.5  # not before their time
        # connected kernels keep theirs, well past the window
        loop.run_until_complete(asyncio.sleep(ABANDONED_AFTER + 1.5))
        assert state(kept["id"]) == "running" and state(blip["id"]) == "running"

        ours = {svc_ns for svc_ns in sandbox_namespaces() if svc_ns in svc.leftovers()}
        assert never["details"]["netns"] not in ours and dropped["details"]["netns"] not in ours
        assert kept["details"]["netns"] in ours and blip["details"]["netns"] in ours

        stops = {e["sandbox"]: e for e in svc.audit() if e.get("event") == "sandbox" and e.get("action") == "stop"}
        for sb in (never, dropped):
            assert stops[sb["id"]]["by"] == "service" and stops[sb["id"]]["user"] == "alice"
            assert stops[sb["id"]]["reason"].startswith("abandoned: no kernel connected for")
        assert kept["id"] not in stops and blip["id"] not in stops

        # the stopped records are forgotten keep_stopped seconds after they ended
        _wait(lambda: state(never["id"]) is None and state(dropped["id"]) is None, 10,
              "ended sandboxes' records were kept past keep_stopped")
        listed = {s["id"] for s in svc.api("GET", "api/sandboxes", token, proxied=False).json()["sandboxes"]}
        assert listed == {kept["id"], blip["id"]}
        ws_kept.close()
        ws_blip.close()
    finally:
        asyncio.set_event_loop(None)
        loop.close()


#: a kernel in a process of its own (so that the test can SIGKILL it): starts its sandbox
#: through the hub's proxy, prints the sandbox's id, runs one cell, then idles
KERNEL_PROCESS = r"""
import asyncio, logging, sys
from sandbox_kernel.hub.backend import HubBackend
from sandbox_kernel.policy.model import EgressPolicy
from sandbox_kernel.session import Session

class Sink:
    def on_event(self, frame):
        pass

    async def on_input_request(self, prompt, password):
        return None

async def main(url, token, kernel_id, code):
    session = Session(HubBackend(service_url=url, api_token=token), kernel_id, EgressPolicy(),
                      logging.getLogger("kernel"))
    await session.ready()
    print(session.backend.sandbox_id, flush=True)
    await session.execute(code, Sink())
    await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""


def _cut(session) -> None:
    """Drop a kernel's stream as a network failure does: the TCP connection closes, no
    websocket close frame (HubTransport re-opens it, as after any dropped stream)."""
    session.backend._transport._ws.protocol.stream.close()


def test_kernels_idle_or_reconnecting_keep_their_sandboxes_and_killed_ones_are_collected(
        spare_service, kernels_for, hub, tmp_path):
    """The kernel's own path (a Session over HubBackend, through the hub's proxy): a kernel
    idle for twice the window keeps its interpreter, so does one whose connection is cut again
    and again; a kernel SIGKILLed while its cell floods output loses its sandbox after the
    window; a kernel SIGKILLed after its sandbox's agent exited leaves nothing behind."""
    svc = spare_service(env={"SANDBOX_HUB_ABANDONED_AFTER": str(ABANDONED_AFTER), "SANDBOX_HUB_KEEP_STOPPED": "5"})
    k = kernels_for(svc)
    token = hub.tokens["alice"]

    def record(sid: str, user: str = "alice") -> dict | None:
        r = svc.api("GET", f"api/sandboxes/{sid}", hub.tokens[user], proxied=False)
        return r.json() if r.status_code == 200 else None

    def wait(predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, what
            k.run(asyncio.sleep(0.2))  # the kernels' loop runs meanwhile (pings, re-opens)

    def kernel_process(kernel_id: str, code: str) -> subprocess.Popen:
        with open(tmp_path / f"{kernel_id}.log", "ab") as log:
            return subprocess.Popen([sys.executable, "-c", KERNEL_PROCESS, svc.proxied_url, token, kernel_id, code],
                                    stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)

    idle = k.open("alice")
    assert k.execute(idle, "x = 41")[0].status == "ok"
    flaky = k.open("bob")
    assert k.execute(flaky, "y = 'still here'")[0].status == "ok"
    processes = [kernel_process("k-flooding", "while True:\n    print('x' * 500)"),
                 # its agent ends (as an out-of-memory kill would end it) after the kernel is gone
                 kernel_process("k-agent-exits", "import os, time; time.sleep(2); os._exit(3)")]
    try:
        flooding_id = processes[0].stdout.readline().strip()
        exited_id = processes[1].stdout.readline().strip()
        assert flooding_id and exited_id, (tmp_path / "k-flooding.log").read_text()[-2000:]
        wait(lambda: record(flooding_id)["attached"] and record(exited_id)["attached"], 10,
             "the kernels did not attach")
        k.run(asyncio.sleep(1.0))  # the cells run, one floods
        flooding, exited = record(flooding_id), record(exited_id)
        for proc in processes:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    killed = time.monotonic()

    # the agent that exited with nobody attached: its namespace goes with it, not left for a
    # kernel that never comes back
    wait(lambda: record(exited_id)["state"] == "exited", 10, "the agent did not exit")
    assert "3" in record(exited_id)["exit_reason"], record(exited_id)
    wait(lambda: exited["details"]["netns"] not in sandbox_namespaces(), 5,
         "an exited sandbox's namespace was left behind")

    # bob's connection is cut four times, 1.2 s apart: longer than the window in all, never without a kernel for long
    for _ in range(4):
        before = flaky.backend._transport._ws
        _cut(flaky)
        wait(lambda: flaky.backend._transport._ws is not before, 10, "the kernel did not re-open its stream")
        k.run(asyncio.sleep(1.2))

    wait(lambda: record(flooding_id)["state"] == "stopped", ABANDONED_AFTER + 10,
         "the killed kernel's sandbox was not collected")
    assert time.monotonic() - killed >= ABANDONED_AFTER - 1.5  # not before its time
    wait(lambda: flooding["details"]["netns"] not in sandbox_namespaces(), 10,
         "the collected sandbox's namespace is still there")
    stop = [e for e in svc.audit() if e.get("event") == "sandbox" and e.get("sandbox") == flooding_id
            and e.get("action") == "stop"]
    assert len(stop) == 1 and stop[0]["by"] == "service" and stop[0]["user"] == "alice", stop
    assert stop[0]["reason"].startswith("abandoned: no kernel connected for")

    # well past the window (for the idle kernel, twice it): both live kernels have their interpreters
    k.run(asyncio.sleep(max(0.0, 2 * ABANDONED_AFTER - (time.monotonic() - killed))))
    for session, user, code, out in ((idle, "alice", "print(x + 1)", "42"), (flaky, "bob", "print(y)", "still here")):
        sb = record(session.backend.sandbox_id, user)
        assert sb["state"] == "running" and sb["attached"], sb
        result, sink = k.execute(session, code)
        assert result.status == "ok" and sink.stdout().strip() == out, (result, sink.frames[-3:])
        assert session.restarts == 0 and session.lost is None
    collected = {e["sandbox"] for e in svc.audit() if e.get("by") == "service"}
    assert collected == {flooding_id}, collected

    # the ended records are forgotten keep_stopped after they ended, and nothing is left running
    wait(lambda: record(flooding_id) is None and record(exited_id) is None, 10,
         "ended sandboxes' records were kept past keep_stopped")
    assert exited["details"]["netns"] not in svc.leftovers()


def test_after_a_service_restart_the_clock_starts_at_restore(spare_service, hub):
    """A restart does not carry the clock over: a sandbox that was unattached for most of the
    window before the restart gets the whole window again after its restore, then goes."""
    svc = spare_service(env={"SANDBOX_HUB_ABANDONED_AFTER": str(ABANDONED_AFTER)})
    token = hub.tokens["bob"]
    r = svc.api("POST", "api/sandboxes", token, json={"kernel_id": "k-across-restart"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]

    def record() -> dict:
        return svc.api("GET", f"api/sandboxes/{sid}", token, proxied=False).json()

    time.sleep(ABANDONED_AFTER - 1)
    svc.restart()
    _wait(lambda: record()["state"] == "running" and record()["restarts"] == 1, 30, "the sandbox was not restored")
    restored = time.monotonic()
    time.sleep(ABANDONED_AFTER - 1)
    assert record()["state"] == "running"  # before the restart plus after it is past the window: not collected
    _wait(lambda: record()["state"] == "stopped", 10, "the restored sandbox was not collected")
    assert time.monotonic() - restored >= ABANDONED_AFTER - 1
    netns = record()["details"]["netns"]
    _wait(lambda: netns not in sandbox_namespaces(), 10, "the collected sandbox's namespace is still there")
    stops = [e for e in svc.audit() if e.get("sandbox") == sid and e.get("action") == "stop"]
    assert [e["by"] for e in stops] == ["service"], stops
