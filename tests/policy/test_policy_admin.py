"""The administrator's ceiling: configuration, decisions, refusals."""

from __future__ import annotations

import ipaddress

import pytest
from traitlets import TraitError
from traitlets.config import Config

from sandbox_kernel.errors import PolicyError
from sandbox_kernel.policy.admin import DEFAULT_ALWAYS_BLOCKED, AdminPolicy, CeilingRefused
from sandbox_kernel.policy.model import EgressPolicy


def test_defaults():
    admin = AdminPolicy()
    assert admin.mode == "deny" and not admin.locked and admin.user_may_allow == ["public"]
    assert admin.default_policy() == EgressPolicy()
    blocked = {str(n) for n in admin.blocked_networks()}
    assert set(DEFAULT_ALWAYS_BLOCKED) <= blocked
    assert {"169.254.0.0/16", "fd00:ec2::254/128", "fe80::/10", "127.0.0.0/8", "::1/128", "0.0.0.0/8"} <= blocked


def test_every_trait_names_its_environment_variable():
    for name, trait in AdminPolicy.class_traits(config=True).items():
        assert "SANDBOX_KERNEL_POLICY_" in trait.help, name


def test_config_file_and_environment(monkeypatch):
    config = Config()
    config.AdminPolicy.locked = True
    config.AdminPolicy.cluster_ranges = ["10.0.0.0/8"]
    assert AdminPolicy(config=config).locked
    monkeypatch.setenv("SANDBOX_KERNEL_POLICY_LOCKED", "yes")
    monkeypatch.setenv("SANDBOX_KERNEL_POLICY_MODE", "allowlist")
    monkeypatch.setenv("SANDBOX_KERNEL_POLICY_PRESETS", "pypi,github")
    monkeypatch.setenv("SANDBOX_KERNEL_POLICY_ENTRIES", "a.example.com:443 10.9.0.0/16")
    monkeypatch.setenv("SANDBOX_KERNEL_POLICY_CLUSTER_RANGES", "10.0.0.0/8, 192.168.0.0/16")
    admin = AdminPolicy()
    assert admin.locked and admin.default_policy().describe() == "allowlist (2 entries, presets: pypi, github)"
    assert ipaddress.ip_network("192.168.0.0/16") in admin.blocked_networks()
    config.AdminPolicy.locked = False
    assert not AdminPolicy(config=config).locked  # the config file wins over the environment
    monkeypatch.setenv("SANDBOX_KERNEL_POLICY_LOCKED", "maybe")
    with pytest.raises(TraitError, match="not a boolean"):
        AdminPolicy().locked


@pytest.mark.parametrize(
    "trait, value, words",
    [
        ("entries", ["bad..com"], "AdminPolicy.entries: 'bad..com'"),
        ("presets", ["nope"], "unknown preset"),
        ("user_may_allow", ["*.co.uk"], "public suffix"),
        ("always_blocked", ["10.0.0.1/8"], "AdminPolicy.always_blocked"),
        ("cluster_ranges", ["nonsense"], "not a CIDR"),
        ("max_entries", -1, "0 or more"),
    ],
)
def test_bad_configuration_fails_loudly(trait, value, words):
    with pytest.raises(TraitError, match=words.replace("*", r"\*").replace(".", r"\.")):
        AdminPolicy(**{trait: value})


def test_metadata_floor_cannot_be_configured_away():
    admin = AdminPolicy(always_blocked=[])
    assert admin.blocks("169.254.169.254") and admin.blocks("fd00:ec2::254")
    assert not admin.blocks("127.0.0.1")


@pytest.mark.parametrize(
    "patterns, entry, allowed",
    [
        (["public"], "api.github.com:443", True),
        (["public"], "*.pythonhosted.org", True),
        (["public"], "8.8.8.0/24", True),
        (["public"], "0.0.0.0/0", False),  # contains private ranges
        (["public"], "10.0.0.0/8", False),
        (["public"], "[2001:db8::1]:443", False),  # documentation range
        (["public"], "169.254.169.254", False),
        (["any"], "10.0.0.0/8", True),
        (["any"], "169.254.169.254:80", False),  # always blocked beats everything
        (["*.github.com"], "api.github.com:443", True),
        (["*.github.com"], "*.github.com", True),
        (["*.github.com"], "a.b.github.com", False),
        (["*.github.com"], "github.com", False),
        (["pypi.org:443"], "pypi.org:443/tcp", True),
        (["pypi.org:443"], "pypi.org", False),  # any port is more than 443
        (["pypi.org:443/tcp"], "pypi.org:443", False),  # tcp+udp is more than tcp
        (["10.0.0.0/8:5432/tcp"], "10.1.0.0/16:5432/tcp", True),
        (["10.0.0.0/8:5432/tcp"], "10.1.0.0/16:5433/tcp", False),
        (["10.0.0.0/8"], "11.0.0.0/8", False),
        (["example.com:8000-8100"], "example.com:8010-8020,8050", True),
        (["example.com:8000-8100"], "example.com:8000-8101", False),
        ([], "api.github.com", False),
    ],
)
def test_decide(patterns, entry, allowed):
    decision = AdminPolicy(user_may_allow=patterns).decide(entry)
    assert decision.allowed is allowed
    if allowed:
        assert decision.reason.startswith("you may allow it: %sandbox allow ")
    else:
        assert decision.reason.startswith("not permitted by your administrator")


def test_decide_connection_gives_the_narrowest_advice():
    admin = AdminPolicy()
    decision = admin.decide_connection("140.82.112.5", 443, "tcp", host="api.github.com")
    assert decision.allowed and decision.reason == "you may allow it: %sandbox allow api.github.com:443/tcp"
    assert admin.decide_connection("2606:50c0::1", 443, "tcp").reason.endswith("allow [2606:50c0::1]:443/tcp")
    metadata = admin.decide_connection("169.254.169.254", 80, "tcp", host="metadata.google.internal")
    assert not metadata.allowed and "169.254.0.0/16" in metadata.reason and "metadata" in metadata.reason


def test_check_change():
    admin = AdminPolicy(user_may_allow=["*.github.com", "pypi.org:443"], max_entries=3)
    deny = EgressPolicy()
    ok = EgressPolicy(mode="allowlist", entries=("api.github.com:443", "pypi.org:443"))
    admin.check_change(deny, ok)
    admin.check_change(ok, deny)  # narrowing is always fine
    with pytest.raises(CeilingRefused) as info:
        admin.check_change(ok, ok.with_entries_added("evil.example.com"))
    err = info.value
    assert isinstance(err, PolicyError) and str(err.entry) == "evil.example.com"
    assert "administrator's rule" in str(err) and "not changed" in str(err)
    with pytest.raises(CeilingRefused, match="at most 3 entries"):
        admin.check_change(ok, ok.with_entries_added("a.github.com", "b.github.com"))
    admin.check_change(ok, ok.with_entries_added("evil.example.com"), who="admin")


def test_switching_on_rechecks_kept_entries_but_not_the_admin_defaults():
    admin = AdminPolicy(user_may_allow=[], mode="allowlist", entries=["mirror.internal.example.com"])
    default = admin.default_policy()
    admin.check_change(default.with_mode("deny"), default)
    kept = EgressPolicy(mode="deny", entries=("other.example.com",))
    with pytest.raises(CeilingRefused, match="other.example.com"):
        admin.check_change(kept, kept.with_mode("allowlist"))


def test_locked_refuses_every_change():
    admin = AdminPolicy(locked=True)
    policy = EgressPolicy(mode="allowlist", entries=("api.github.com",))
    with pytest.raises(CeilingRefused, match="locked"):
        admin.check_change(policy, policy.with_mode("deny"))
    admin.check_change(policy, policy)
    assert not admin.decide("api.github.com").allowed


def test_a_backends_reserved_ranges_are_refused_with_their_reason():
    """The local uplink's own ranges (issue 20, point 5) join the ceiling: no entry inside them
    is accepted, even where users may allow anything, and notices say what the range is."""
    from sandbox_kernel.backends.local import LocalBackend

    admin = AdminPolicy(user_may_allow=["any"])
    assert admin.decide("10.0.2.3:53/udp").allowed
    admin.reserved = dict(LocalBackend.reserved_ranges)
    for entry in ("10.0.2.3:53/udp", "10.0.2.0/24", "[fd00::2]:80"):
        decision = admin.decide(entry)
        assert not decision.allowed and "the sandbox's own network" in decision.reason, (entry, decision)
    assert "uplink" in admin.blocked_reason("10.0.2.2")
    assert admin.decide("10.0.3.1:53/udp").allowed
