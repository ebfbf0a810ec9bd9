"""%sandbox arguments, fuzzed: a clear typed error or a valid change, never anything else."""

import asyncio
import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox_kernel.controls import Controls
from sandbox_kernel.errors import SandboxError
from sandbox_kernel.magics import SandboxMagics, is_sandbox_line, split_cell
from sandbox_kernel.policy.admin import AdminPolicy
from sandbox_kernel.policy.model import EgressPolicy


class StubBackend:
    """A backend that enforces nothing: the controls check the ceiling themselves."""

    name = "stub"
    applied: dict = {}
    enforces_ceiling = False


class StubSession:
    """The Session's part the controls use: ready, apply_policy (records what was applied)."""

    info = None

    def __init__(self):
        self.applied = []

    async def ready(self):
        return None

    async def apply_policy(self, policy):
        self.applied.append(policy)
        return {"enforcer": "stub"}

    async def restart(self):
        return None


def make_controls() -> tuple[Controls, StubSession]:
    """Real controls (ceiling check, atomic set_policy, grants, learner) over a stub session."""
    admin = AdminPolicy(user_may_allow=["public"], locked=False)
    controls = Controls(admin, EgressPolicy(), StubBackend(), log=logging.getLogger("test"))
    session = StubSession()
    controls.bind(session)
    return controls, session


VERBS = st.sampled_from(["allow", "revoke", "mode", "preset", "status", "blocked", "learn", "help", "", "bogus"])
ARGS = st.lists(st.one_of(st.text(max_size=40), st.from_regex(r"[a-z0-9.*:/\[\]-]{1,30}", fullmatch=True)),
                max_size=4)


@settings(max_examples=300, deadline=None)
@given(VERBS, ARGS, st.text(max_size=20))
def test_magic_lines_never_fail_untyped(verb, args, tail):
    controls, session = make_controls()
    magics = SandboxMagics(controls)
    line = " ".join(["%sandbox", verb, *args]) + tail
    before = controls.policy
    try:
        asyncio.run(magics.run(line))
    except SandboxError:
        assert controls.policy == before  # refused: nothing changed
    if controls.policy != before:
        assert session.applied[-1] == controls.policy
        controls.admin.check_change(before, controls.policy)  # what is in force is within the ceiling


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30).filter(lambda t: "\n" not in t),
                          st.sampled_from(["%sandbox allow x.org", "%sandboxy", "  %sandbox mode deny", "%sandbox"])),
                max_size=8).map("\n".join))
def test_split_cell_keeps_every_line(code):
    parts = split_cell(code)
    rebuilt = [line for kind, text in parts for line in ([text] if kind == "magic" else text.split("\n"))]
    kept = [line for line in code.split("\n") if line.strip()]
    assert [l for l in rebuilt if l.strip()] == [l.rstrip() if is_sandbox_line(l.rstrip()) else l for l in kept]
    # only top-level %sandbox lines are taken by the kernel; indented ones go to the sandbox
    assert all(is_sandbox_line(text) for kind, text in parts if kind == "magic")
