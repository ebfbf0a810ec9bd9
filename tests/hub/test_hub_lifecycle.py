"""The service collects what kernels leave behind: a sandbox no kernel is attached to for
``abandoned_after`` seconds is stopped (its namespace removed, audited), a connected kernel is
never collected however idle, one that re-attaches in time keeps its sandbox, and records of
ended sandboxes are forgotten ``keep_stopped`` seconds later."""

from __future__ import annotations

import asyncio
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
              ABANDONED_AFTER + 10, "abandoned sandboxes were not collected")
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
