"""User names → namespace names: DNS-safe, collision-free, never another namespace."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from sandbox_kernel.backends.kubernetes.slug import NameTemplateError, label_value, pod_name, slugify, user_namespace

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def valid(ns: str) -> bool:
    return len(ns) <= 63 and bool(DNS_LABEL.match(ns))


def test_safe_name_is_kept():
    assert user_namespace("alice") == "user-sandbox-alice"
    assert user_namespace("a-b-1") == "user-sandbox-a-b-1"


@pytest.mark.parametrize("user", ["Alice", "../kube-system", "kube-system/../x", "bob@example.com",
                                  "日本語", "émile", "a--b", "-x-", "", " ", "x" * 300, "A" * 300,
                                  "user.name", "UPPER"])
def test_changed_names_get_a_hash_and_are_valid(user):
    ns = user_namespace(user)
    assert valid(ns), ns
    assert ns.startswith("user-sandbox-")
    assert re.search(r"--[0-9a-f]{8}$", ns), ns


def test_examples():
    assert user_namespace("Alice") != user_namespace("alice")
    assert user_namespace("../kube-system").startswith("user-sandbox-kube-system--")
    assert user_namespace("kube-system") == "user-sandbox-kube-system"
    assert len(user_namespace("x" * 300)) == 63
    assert user_namespace("日本語").startswith("user-sandbox-u--")


def test_a_user_cannot_pick_another_users_hashed_slug():
    alice = user_namespace("Alice")  # user-sandbox-alice--xxxxxxxx
    impostor = alice[len("user-sandbox-"):]
    assert user_namespace(impostor) != alice  # contains "--": it is hashed, never kept


@pytest.mark.parametrize("template", ["{slug}", "{slug}-sandbox", "x{slug}{slug}", "Users-{slug}",
                                      "no-slug", "9-{slug}", "user_{slug}"])
def test_templates_without_a_fixed_prefix_are_refused(template):
    with pytest.raises(NameTemplateError):
        user_namespace("alice", template)


def test_reserved_namespace_is_refused():
    with pytest.raises(NameTemplateError):
        user_namespace("system", "kube-{slug}")


def test_custom_template_and_long_prefix():
    assert user_namespace("alice", "jhub-{slug}-sbx") == "jhub-alice-sbx"
    with pytest.raises(NameTemplateError):
        user_namespace("alice", "a" * 55 + "-{slug}")


def test_pod_name_and_label_value():
    assert pod_name("0b9c1e4e-2f4d-4c8e-9e5e-1f2a3b4c5d6e") == "sandbox-0b9c1e4e-2f4d-4c8e-9e5e-1f2a3b4c5d6e"
    assert len(pod_name("K" * 200)) <= 63
    assert label_value("Alice Smith").startswith("alice-smith--")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(max_size=80), min_size=2, max_size=6, unique=True))
def test_property_valid_and_collision_free(users):
    names = [user_namespace(u) for u in users]
    assert all(valid(n) and n.startswith("user-sandbox-") for n in names)
    assert len(set(names)) == len(users)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=70))
def test_property_near_safe_names(user):
    ns = user_namespace(user)
    assert valid(ns)
    # a kept name is the user name itself; anything else carries the hash
    assert ns == "user-sandbox-" + user or re.search(r"--[0-9a-f]{8}$", ns)
    assert slugify(user) == user or "--" in slugify(user)
