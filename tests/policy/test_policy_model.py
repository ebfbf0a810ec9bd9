"""Entry syntax, policy documents and the EgressPolicy methods."""

from __future__ import annotations

import json

import pytest

from sandbox_kernel.errors import PolicyError
from sandbox_kernel.policy.model import (
    EgressPolicy,
    Entry,
    EntryNotFound,
    InvalidEntry,
    InvalidPolicy,
    PolicyFileError,
    UnknownPreset,
    load_policy_file,
    parse_entry,
)

VALID = [
    # text, kind, value, ports, protocol, canonical text
    ("api.github.com", "domain", "api.github.com", (), None, "api.github.com"),
    ("API.GitHub.com.", "domain", "api.github.com", (), None, "api.github.com"),
    ("  pypi.org:443  ", "domain", "pypi.org", ((443, 443),), None, "pypi.org:443"),
    ("api.github.com:443/tcp", "domain", "api.github.com", ((443, 443),), "tcp", "api.github.com:443/tcp"),
    ("x.example.com:443,80", "domain", "x.example.com", ((80, 80), (443, 443)), None, "x.example.com:80,443"),
    ("x.example.com:8000-8100", "domain", "x.example.com", ((8000, 8100),), None, "x.example.com:8000-8100"),
    ("x.example.com:80,81,8000-8100,8050", "domain", "x.example.com", ((80, 81), (8000, 8100)), None, "x.example.com:80-81,8000-8100"),
    ("dns.example.com/UDP", "domain", "dns.example.com", (), "udp", "dns.example.com/udp"),
    ("*.pythonhosted.org", "wildcard", "*.pythonhosted.org", (), None, "*.pythonhosted.org"),
    ("*.Example.COM:443", "wildcard", "*.example.com", ((443, 443),), None, "*.example.com:443"),
    ("10.1.2.0/24:5432/tcp", "cidr", "10.1.2.0/24", ((5432, 5432),), "tcp", "10.1.2.0/24:5432/tcp"),
    ("10.1.2.3", "cidr", "10.1.2.3/32", (), None, "10.1.2.3"),
    ("0.0.0.0/0", "cidr", "0.0.0.0/0", (), None, "0.0.0.0/0"),
    ("2001:db8::1", "cidr", "2001:db8::1/128", (), None, "2001:db8::1"),
    ("2001:DB8::/32", "cidr", "2001:db8::/32", (), None, "2001:db8::/32"),
    ("[2001:db8::/32]:443", "cidr", "2001:db8::/32", ((443, 443),), None, "[2001:db8::/32]:443"),
    ("[2001:db8::1]", "cidr", "2001:db8::1/128", (), None, "2001:db8::1"),
    ("2001:db8::/32/udp", "cidr", "2001:db8::/32", (), "udp", "[2001:db8::/32]/udp"),
    ("bücher.de", "domain", "xn--bcher-kva.de", (), None, "xn--bcher-kva.de"),
    ("BÜCHER.de:443", "domain", "xn--bcher-kva.de", ((443, 443),), None, "xn--bcher-kva.de:443"),
    ("пример.рф", "domain", "xn--e1afmkfd.xn--p1ai", (), None, "xn--e1afmkfd.xn--p1ai"),
    ("例え.jp", "domain", "xn--r8jz45g.jp", (), None, "xn--r8jz45g.jp"),
]


@pytest.mark.parametrize("text, kind, value, ports, protocol, canonical", VALID)
def test_valid_entries(text, kind, value, ports, protocol, canonical):
    entry = parse_entry(text)
    assert (entry.kind, entry.value, entry.ports, entry.protocol) == (kind, value, ports, protocol)
    assert str(entry) == canonical
    assert parse_entry(str(entry)) == entry


INVALID = [
    # text, words the reason must contain
    ("", "empty"),
    ("   ", "empty"),
    ("a b.com", "whitespace"),
    ("a.com\t:443", "whitespace"),
    ("bad..com", "empty label"),
    (".a.com", "empty label"),
    ("-a.com", "starts or ends with '-'"),
    ("a_b.com", "only letters, digits"),
    ("a" * 64 + ".com", "at most 63"),
    (".".join(["a" * 60] * 5), "at most 253"),
    ("localhost", "single label"),
    ("1.2.3.400", "not a valid IP"),
    ("10.1.2.3/24", "host bits set; did you mean 10.1.2.0/24"),
    ("2001:db8::1/32", "host bits set"),
    ("10.0.0.0/33", "not a valid IP"),
    ("x.com:0", "out of range"),
    ("x.com:65536", "out of range"),
    ("x.com:90-80", "reversed"),
    ("x.com:", "not followed by a port"),
    ("x.com:http", "not a number"),
    ("x.com:80,,443", "not a number"),
    ("x.com/icmp", "unknown protocol"),
    ("/tcp", "no destination"),
    (":443", "no destination"),
    ("a.*.com", "whole first label"),
    ("*foo.com", "whole first label"),
    ("*.*.foo.com", "whole first label"),
    ("*", "whole first label"),
    ("*.com", "top-level domain"),
    ("*.co.uk", "public suffix"),
    ("*.github.io", "public suffix"),
    # beyond the hand-picked subset the project shipped before the Public Suffix List itself
    ("*.s3.amazonaws.com", "public suffix"),
    ("*.lg.jp", "public suffix"),
    ("*.gov.scot", "public suffix"),
    ("[a.com]:443", "only for IPv6"),
    ("[2001:db8::1", "closing"),
    ("[2001:db8::1]443", "after ']'"),
    ("fe80::1%eth0", "zone"),
    ("::ffff:169.254.169.254", "IPv4-mapped"),
    ("pаypal.com", "mixes Cyrillic and Latin"),  # Cyrillic 'а'
    ("xn--pypal-4ve.com", "mixes Cyrillic and Latin"),  # the same, as punycode
    ("аррӏе.com", "whole-script homoglyph"),  # all Cyrillic
    ("gοogle.com", "mixes Greek and Latin"),  # Greek omicron
    ("☃.com", "not a valid internationalized"),
    ("xn--zz.com", "not valid punycode"),
]


@pytest.mark.parametrize("text, reason", INVALID)
def test_invalid_entries_name_entry_and_reason(text, reason):
    with pytest.raises(InvalidEntry) as info:
        parse_entry(text)
    err = info.value
    assert isinstance(err, PolicyError)
    assert err.entry == text
    assert reason in err.reason
    assert repr(text) in str(err) and reason in str(err)


@pytest.mark.parametrize("value", [None, 443, ["a.com"], {"a": 1}, b"a.com"])
def test_non_string_entries(value):
    with pytest.raises(InvalidEntry, match="must be a string"):
        parse_entry(value)


def test_parse_forms():
    assert EgressPolicy.parse("deny") == EgressPolicy()
    assert EgressPolicy.parse("allowlist") == EgressPolicy(mode="allowlist")
    from_list = EgressPolicy.parse(["pypi.org:443", "pypi.org:443", "10.0.0.0/8"])
    assert from_list.mode == "allowlist" and [str(e) for e in from_list.entries] == ["pypi.org:443", "10.0.0.0/8"]
    assert EgressPolicy.parse("pypi.org:443 10.0.0.0/8") == from_list
    doc = {"name": "course-1", "mode": "allowlist", "entries": ["a.example.com"], "presets": ["pypi"]}
    policy = EgressPolicy.parse(doc)
    assert policy.to_dict() == doc
    assert EgressPolicy.parse(policy.to_dict()) == policy
    assert EgressPolicy.parse(policy) is policy


@pytest.mark.parametrize(
    "doc, error, words",
    [
        ({"mode": "allow"}, InvalidPolicy, "mode must be"),
        ({"entries": "a.com"}, InvalidPolicy, "must be a list"),
        ({"entires": []}, InvalidPolicy, "unknown key 'entires'"),
        ({"presets": ["pipy"]}, UnknownPreset, "unknown preset 'pipy'; known presets: conda, github"),
        ({"name": "Not A Label"}, InvalidPolicy, "lowercase DNS label"),
        ({"mode": "allowlist", "entries": ["ok.com", "bad..com"]}, InvalidEntry, "entries[1]: 'bad..com'"),
        (42, InvalidPolicy, "expected a mapping"),
        (None, InvalidPolicy, "expected a mapping"),
    ],
)
def test_invalid_policies(doc, error, words):
    with pytest.raises(error) as info:
        EgressPolicy.parse(doc)
    assert words in str(info.value)


def test_load_policy_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("mode: allowlist\npresets: [pypi]\nentries:\n  - api.github.com:443\n")
    assert load_policy_file(path).describe() == "allowlist (1 entry, presets: pypi)"
    jpath = tmp_path / "p.json"
    jpath.write_text(json.dumps(["a.example.com"]))
    assert load_policy_file(jpath).entries == (parse_entry("a.example.com"),)
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries:\n  - ok.com\n  - 10.1.2.3/24\n")
    with pytest.raises(InvalidEntry) as info:
        load_policy_file(bad)
    assert str(bad) in str(info.value) and "entries[1]" in str(info.value) and "host bits" in str(info.value)
    for content, words in [("mode: [", "not valid YAML"), ("", "empty")]:
        bad.write_text(content)
        with pytest.raises(PolicyFileError, match=words):
            load_policy_file(bad)
    with pytest.raises(PolicyFileError, match="cannot read"):
        load_policy_file(tmp_path / "missing.yaml")


def test_presets_expand_and_deduplicate():
    policy = EgressPolicy(mode="allowlist", entries=("pypi.org:443/tcp", "x.example.com"), presets=("pypi", "github"))
    expanded = [str(e) for e in policy.expanded_entries()]
    assert expanded[:2] == ["pypi.org:443/tcp", "files.pythonhosted.org:443/tcp"]
    assert expanded.count("pypi.org:443/tcp") == 1
    assert expanded[-1] == "x.example.com"
    assert "api.github.com:443/tcp" in expanded
    for name in ("pypi", "github", "huggingface", "conda"):
        assert EgressPolicy(mode="allowlist", presets=(name,)).expanded_entries()


def test_changes_return_new_policies():
    base = EgressPolicy()
    on = base.with_mode("allowlist").with_entries_added("a.example.com:443", "10.0.0.0/8")
    assert base == EgressPolicy() and on.describe() == "allowlist (2 entries)"
    assert on.with_entries_added("A.example.com:443") == on
    off = on.with_entries_removed("a.example.com:443")
    assert [str(e) for e in off.entries] == ["10.0.0.0/8"]
    with pytest.raises(EntryNotFound, match="'b.example.com' is not in the policy"):
        on.with_entries_removed("b.example.com")
    with pytest.raises(InvalidEntry):
        on.with_entries_added("bad..com")
    assert on.with_presets_added("pypi").with_presets_removed("pypi") == on
    assert on.with_mode("deny").describe() == "default-deny"
    with pytest.raises(InvalidPolicy):
        on.with_mode("open")


def test_allows():
    policy = EgressPolicy.parse(
        ["api.github.com:443/tcp", "*.pythonhosted.org:443", "10.1.2.0/24:5432/tcp", "[2001:db8::/32]:443", "x.example.com:8000-8100"]
    )
    assert policy.allows("140.82.112.5", 443, "tcp", "API.github.com")
    assert not policy.allows("140.82.112.5", 80, "tcp", "api.github.com")
    assert not policy.allows("140.82.112.5", 443, "udp", "api.github.com")
    assert not policy.allows("140.82.112.5", 443, "tcp")  # a domain entry needs the host
    assert policy.allows("1.2.3.4", 443, "tcp", "files.pythonhosted.org")
    assert not policy.allows("1.2.3.4", 443, "tcp", "pythonhosted.org")  # one label, not zero
    assert not policy.allows("1.2.3.4", 443, "tcp", "a.b.pythonhosted.org")  # nor two
    assert policy.allows("10.1.2.200", 5432, "tcp")
    assert policy.allows("::ffff:10.1.2.200", 5432, "tcp")  # v4-mapped is v4
    assert not policy.allows("10.1.3.1", 5432, "tcp")
    assert policy.allows("2001:db8::5", 443, "udp")
    assert policy.allows("9.9.9.9", 8050, "tcp", "x.example.com")
    assert not policy.allows("9.9.9.9", 8101, "tcp", "x.example.com")
    assert not policy.allows("not an ip", 5432, "tcp")
    assert not policy.with_mode("deny").allows("10.1.2.200", 5432, "tcp")


def test_entry_guards_hand_built_values():
    with pytest.raises(InvalidEntry):
        Entry("url", "x")
    with pytest.raises(InvalidEntry):
        Entry("domain", "x.com", ((0, 1),))
