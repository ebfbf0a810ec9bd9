"""Real :class:`~sandbox_kernel.controls.Controls` over a session and a backend that enforce
nothing, for tests of the magics and the views without a kernel or a sandbox."""

from __future__ import annotations

import logging

from sandbox_kernel.controls import Controls
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


def make_controls(**admin) -> tuple[Controls, StubSession]:
    """Real controls (ceiling check, atomic set_policy, grants, learner) over a stub session."""
    ceiling = AdminPolicy(**{"user_may_allow": ["public"], "locked": False, **admin})
    controls = Controls(ceiling, EgressPolicy(), StubBackend(), log=logging.getLogger("test"))
    session = StubSession()
    controls.bind(session)
    return controls, session
