"""The agent link by itself (no sandbox): over the pipes of a real agent process, and of small
processes that write what a hostile or outdated agent would. The kernel's Session and the hub
service's Manager both talk to agents through it (their own tests run it end to end)."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from sandbox_kernel.agent import protocol
from sandbox_kernel.agent.bundle import build_pyz
from sandbox_kernel.agentlink import AgentLink
from sandbox_kernel.backends.base import Backend, LineTransport
from sandbox_kernel.errors import SandboxCrashed, SandboxStartError

LOG = logging.getLogger("agentlink-test")


class ProcessBackend(Backend):
    """What the link asks of a backend (attach, exit_reason), for an unsandboxed process
    that speaks on its stdin/stdout."""

    name = "process"

    def __init__(self, argv: list[str]):
        super().__init__()
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None

    async def attach(self) -> LineTransport:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=protocol.MAX_FRAME + 1)
        return LineTransport(self.proc.stdout, self.proc.stdin)

    async def exit_reason(self) -> str:
        return f"it exited with status {await self.proc.wait()}"

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def speaking(*lines: bytes) -> list[str]:
    """A process that writes ``lines`` and then waits for its stdin to close."""
    script = ("import sys\n"
              f"for line in {list(lines)!r}:\n"
              "    sys.stdout.buffer.write(line); sys.stdout.buffer.flush()\n"
              "sys.stdin.buffer.read()\n")
    return [sys.executable, "-c", script]


HELLO = protocol.encode({"type": "hello", "version": protocol.VERSION, "pid": 1})


class Owner:
    """What a link's owner sees: the frames in order, and each end."""

    def __init__(self):
        self.frames: list[dict] = []
        self.ends: list[AgentLink] = []
        self.ended = asyncio.Event()

    def on_frame(self, frame: dict) -> None:
        self.frames.append(frame)

    def on_end(self, link: AgentLink) -> None:
        self.ends.append(link)
        self.ended.set()

    async def attach(self, backend: Backend, timeout: float = 30) -> AgentLink:
        return await AgentLink.attach(backend, timeout=timeout, log=LOG, on_frame=self.on_frame,
                                      on_end=self.on_end)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    path = tmp_path_factory.mktemp("agent") / "agent.pyz"
    path.write_bytes(build_pyz())
    return path


def test_a_real_agent_greets_answers_and_ends_its_cell_with_the_links_nonce(pyz):
    async def main():
        backend, owner = ProcessBackend([sys.executable, str(pyz)]), Owner()
        link = await owner.attach(backend)
        try:
            assert link.hello["version"] == protocol.VERSION and link.alive
            pong = await link.request({"type": "ping"}, timeout=30)
            assert pong["type"] == "pong" and pong["id"].startswith("r")
            reply = await link.request({"type": "is_complete", "code": "for x in y:"}, timeout=30)
            assert reply["content"]["status"] == "incomplete"
            assert not any(f["type"] in ("reply", "pong") for f in owner.frames)  # they went to the requests
            await link.execute("c1", "print('from the cell')")
            while not any(f["type"] == "done" for f in owner.frames):
                await asyncio.sleep(0.01)
            (done,) = [f for f in owner.frames if f["type"] == "done"]
            assert link.real_done(done)
            assert not link.real_done({**done, "nonce": "0" * 32})  # what other code could write
            assert not link.real_done({**done, "nonce": None})
            assert not link.real_done({**done, "id": "c2"})  # a cell this link never sent
            assert "from the cell" in "".join(f.get("text", "") for f in owner.frames if f["type"] == "stream")
        finally:
            await link.close()
            await backend.stop()
        assert owner.ends == []  # closed by its owner: no end to report
    run(main())


def test_the_reader_decides_the_source_drops_a_second_greeting_and_passes_unclaimed_replies():
    frames = [
        HELLO,
        b'{"type": "blocked", "source": "enforcer", "record": {"ip": "192.0.2.1", "port": 80, "verdict": "rejected"}}\n',
        b'{"type": "blocked", "record": {"ip": "192.0.2.2", "port": 80, "verdict": "guarded"}}\n',
        HELLO,
        b'{"type": "reply", "id": "nobody", "content": {}}\n',
        b'{"type": "stream", "id": "c1", "name": "stdout", "text": "last"}\n',
    ]

    async def main():
        backend, owner = ProcessBackend(speaking(*frames)), Owner()
        link = await owner.attach(backend)
        try:
            while len(owner.frames) < 4:
                await asyncio.sleep(0.01)
        finally:
            await link.close()
            await backend.stop()
        assert [f["type"] for f in owner.frames] == ["blocked", "blocked", "reply", "stream"]
        assert [f["source"] for f in owner.frames[:2]] == ["watcher", "guard"]  # never "enforcer"
    run(main())


@pytest.mark.parametrize("garbage", [  # Python expressions, evaluated by the process
    repr(b"not json\n"),
    repr(b'{"type": "stream", "name": "stdout", "text": 42}\n'),
    repr(b'{"type": "execute", "code": "1"}\n'),
    'b"[" * 200_000 + b"\\n"',
], ids=["text", "field-type", "kernel-type", "deep-nesting"])
def test_a_bad_frame_ends_the_link_once_with_a_plain_reason_and_fails_waiting_requests(garbage):
    after = b'{"type": "stream", "id": "c1", "name": "stdout", "text": "never read"}\n'

    async def main():
        # the garbage comes only after the request was sent (the process waits for a line)
        script = ("import sys\n"
                  f"sys.stdout.buffer.write({HELLO!r}); sys.stdout.buffer.flush()\n"
                  "sys.stdin.buffer.readline()\n"
                  f"sys.stdout.buffer.write({garbage} + {after!r}); sys.stdout.buffer.flush()\n"
                  "sys.stdin.buffer.read()\n")
        backend, owner = ProcessBackend([sys.executable, "-c", script]), Owner()
        link = await owner.attach(backend)
        try:
            with pytest.raises(SandboxCrashed):
                await link.request({"type": "ping"}, timeout=30)
            await owner.ended.wait()
            assert not link.alive
            link.abort("too late")  # an end after the end changes nothing
            assert owner.ends == [link]
            with pytest.raises(SandboxCrashed):  # at once, not after the timeout
                await link.request({"type": "ping"}, timeout=3600)
            assert link.broken.startswith("the sandbox broke the protocol (") and link.broken.endswith(
                "), so it was stopped")
            assert owner.frames == []  # nothing after a bad frame is read
        finally:
            await link.close()
            await backend.stop()
    run(main())


def test_abort_ends_the_link_with_the_owners_reason():
    async def main():
        backend, owner = ProcessBackend(speaking(HELLO)), Owner()
        link = await owner.attach(backend)
        try:
            link.abort("the sandbox did not answer an interrupt within 5 s, so it was stopped")
            assert owner.ends == [link] and link.broken.startswith("the sandbox did not answer")
            await asyncio.sleep(0)
            assert not link.alive
        finally:
            await link.close()
            await backend.stop()
    run(main())


@pytest.mark.parametrize("lines, expected", [
    ([protocol.encode({"type": "hello", "version": 1})],
     "the agent in the sandbox speaks protocol 1, this kernel speaks 2: use matching versions"),
    ([protocol.encode({"type": "stream", "name": "stdout", "text": "hi"})], "the agent did not start: it exited"),
    ([b"\xff garbage\n"], "the agent's greeting broke the protocol (not a JSON frame"),
], ids=["old-version", "no-greeting", "garbage"])
def test_an_agent_that_does_not_greet_properly_is_refused_and_its_stream_closed(lines, expected):
    async def main():
        script = speaking(*lines)
        if "did not start" in expected:  # ends at once instead of waiting for its stdin
            script[-1] = script[-1].replace("sys.stdin.buffer.read()\n", "")
        backend, owner = ProcessBackend(script), Owner()
        try:
            with pytest.raises(SandboxStartError) as raised:
                await owner.attach(backend)
            assert str(raised.value).startswith(expected), raised.value
            # the link closed the stream: a process that reads its stdin to the end exits
            assert await asyncio.wait_for(backend.proc.wait(), 30) == 0
        finally:
            await backend.stop()
    run(main())


def test_an_agent_that_says_nothing_times_out_plainly():
    async def main():
        backend, owner = ProcessBackend(speaking()), Owner()
        try:
            with pytest.raises(SandboxStartError, match=r"the sandbox did not start within 1 s"):
                await owner.attach(backend, timeout=1)
        finally:
            await backend.stop()
    run(main())
