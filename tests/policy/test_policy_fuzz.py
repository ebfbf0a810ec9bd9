"""Parsing never fails with anything but a PolicyError, and canonical text round-trips."""

from __future__ import annotations

import ipaddress
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox_kernel.errors import PolicyError
from sandbox_kernel.policy.model import EgressPolicy, parse_entry

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text built from the characters that matter to the grammar reaches deep paths faster.
GRAMMAR = st.text(alphabet=string.ascii_letters + string.digits + ".:/-*[],_% " + "аеоüß例", max_size=40)


def _parse_or_policy_error(text):
    try:
        return parse_entry(text)
    except PolicyError:
        return None


@FAST
@given(st.text(max_size=80))
def test_any_text_parses_or_raises_policy_error(text):
    entry = _parse_or_policy_error(text)
    if entry is not None:
        assert parse_entry(str(entry)) == entry


@FAST
@given(GRAMMAR)
def test_grammar_text_parses_or_raises_policy_error(text):
    entry = _parse_or_policy_error(text)
    if entry is not None:
        assert parse_entry(str(entry)) == entry


LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")
DOMAIN = st.lists(LABEL, min_size=2, max_size=4).map(".".join).filter(lambda d: not d.rsplit(".", 1)[-1].isdigit())
PORT = st.integers(1, 65535)
PORTS = st.lists(st.tuples(PORT, st.integers(0, 200)).map(lambda t: (t[0], min(65535, t[0] + t[1]))), max_size=3)


@st.composite
def networks(draw):
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    prefix = draw(st.integers(0, bits))
    address = draw(st.integers(0, 2**bits - 1))
    cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    return cls((address, prefix), strict=False)


@st.composite
def entry_texts(draw):
    kind = draw(st.sampled_from(["domain", "wildcard", "cidr"]))
    ports = draw(PORTS)
    protocol = draw(st.sampled_from([None, "tcp", "udp", "TCP"]))
    if kind == "cidr":
        net = draw(networks())
        host = str(net)
        if net.version == 6 and (ports or draw(st.booleans())):
            host = f"[{host}]"
    else:
        host = draw(DOMAIN)
        if kind == "wildcard":
            host = "*." + host
    text = host
    if ports:
        text += ":" + ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)
    if protocol:
        text += "/" + protocol
    return text


@FAST
@given(entry_texts())
def test_structured_entries_round_trip(text):
    entry = _parse_or_policy_error(text)  # some are refused on purpose (public suffixes, mapped v6)
    if entry is not None:
        assert parse_entry(str(entry)) == entry
        assert str(parse_entry(str(entry))) == str(entry)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | entry_texts(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["mode", "entries", "presets", "name", "x"]), inner, max_size=4),
    max_leaves=12,
)


@FAST
@given(JSONISH)
def test_policy_documents_parse_or_raise_policy_error(doc):
    try:
        policy = EgressPolicy.parse(doc)
    except PolicyError:
        return
    assert EgressPolicy.parse(policy.to_dict()) == policy
