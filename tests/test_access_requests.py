"""Requests for access, the parts without a hub: which refusals may offer ``%sandbox request``
(the ceiling's ``Decision.requestable``), the notices' remedy in hub mode, the refusal's
sentence, and the magic's arguments. The path through a real hub is tests/hub/test_hub_requests.py."""

from __future__ import annotations

import pytest

from sandbox_kernel.access import split_request_args
from sandbox_kernel.errors import PolicyError
from sandbox_kernel.notices import NoticeBoard
from sandbox_kernel.policy.admin import AdminPolicy, CeilingRefused
from sandbox_kernel.policy.model import EgressPolicy, parse_entry


def _ceiling(**kw) -> AdminPolicy:
    values = {"mode": "deny", "entries": [], "presets": [], "locked": False, "user_may_allow": ["public"],
              "max_entries": 100, "always_blocked": ["169.254.0.0/16"], "cluster_ranges": ["10.0.0.0/8"]}
    return AdminPolicy(parent=None, **{**values, **kw})


def test_only_what_is_outside_user_may_allow_can_be_requested():
    ceiling = _ceiling()
    outside = ceiling.decide("192.168.7.1:5432/tcp")  # private: not "public", not always blocked
    assert not outside.allowed and outside.requestable
    assert not ceiling.decide("169.254.169.254:80").requestable  # always blocked: no grant opens it
    assert not ceiling.decide("10.1.2.3:80").requestable  # a cluster range, likewise
    assert ceiling.decide("pypi.org:443").allowed
    assert not _ceiling(locked=True).decide("192.168.7.1:5432/tcp").requestable  # exam mode
    # a grant adds exactly its entry to user_may_allow: that entry, nothing wider
    granted = _ceiling(user_may_allow=["public", "192.168.7.1:5432/tcp"])
    assert granted.decide("192.168.7.1:5432/tcp").allowed
    assert not granted.decide("192.168.7.1:5433/tcp").allowed
    assert not granted.decide("192.168.7.2:5432/tcp").allowed


def test_the_refusal_names_the_request_only_where_one_can_be_made():
    with pytest.raises(CeilingRefused) as err:
        _ceiling().check_change(EgressPolicy(), EgressPolicy(mode="allowlist", entries=(parse_entry("192.168.7.1:22/tcp"),)))
    assert err.value.requestable and "ask your administrator if you need this" in str(err.value)
    hinted = CeilingRefused(err.value.reason, err.value.entry, requestable=True, request_hint=True)
    assert "%sandbox request 192.168.7.1:22/tcp --reason" in str(hinted)
    with pytest.raises(CeilingRefused) as err:
        _ceiling().check_change(EgressPolicy(), EgressPolicy(mode="allowlist", entries=(parse_entry("169.254.169.254:80"),)))
    assert not err.value.requestable
    assert "%sandbox request" not in str(CeilingRefused(err.value.reason, err.value.entry, request_hint=True))


def _notice(board: NoticeBoard, ip: str, source: str = "enforcer") -> dict:
    conn, _ = board.add({"ip": ip, "port": 5432, "protocol": "tcp", "verdict": "rejected"}, source)
    return conn.to_json()["remedy"]


def test_hub_mode_notices_offer_a_request_for_what_an_administrator_could_grant():
    hub = NoticeBoard(EgressPolicy(), _ceiling(), requests=True)
    remedy = _notice(hub, "192.168.7.1")
    assert remedy["action"] == "forbidden" and remedy["request"] == "%sandbox request 192.168.7.1:5432/tcp"
    assert "Request access" in hub.connections()[0].text() and "Request access" in hub.connections()[0].html()
    assert "request" not in _notice(hub, "169.254.169.254")  # always blocked
    assert "request" not in _notice(hub, "192.168.7.2", source="guard")  # the sandbox's word: nothing offered
    local = NoticeBoard(EgressPolicy(), _ceiling())  # no service to ask
    assert "request" not in _notice(local, "192.168.7.1")


@pytest.mark.parametrize("args,entries,reason", [
    (["a.example.org:443"], ["a.example.org:443"], ""),
    (["a.example.org:443", "--reason", "lab 3 data"], ["a.example.org:443"], "lab 3 data"),
    (["--reason=why not", "a.example.org", "10.1.0.0/16:5432/tcp"], ["a.example.org", "10.1.0.0/16:5432/tcp"], "why not"),
])
def test_request_arguments(args, entries, reason):
    assert split_request_args(args) == (entries, reason)


@pytest.mark.parametrize("args,says", [
    ([], "name at least one destination"),
    (["--reason", "x"], "name at least one destination"),
    (["a.example.org", "--reason"], "say why"),
    (["a.example.org", "--reason", "x", "--reason", "y"], "once"),
    (["a.example.org", "--for", "10m"], "unknown option --for"),
])
def test_bad_request_arguments_say_what_is_wrong(args, says):
    with pytest.raises(PolicyError, match=says):
        split_request_args(args)
